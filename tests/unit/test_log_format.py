"""The log formats an operator's tools read: the flat JSON schema (Loki, Elastic,
Datadog take it as it is), text timestamps with their UTC offset, the journal's
``<N>`` priorities (``journalctl -p err``), and the email address only when allowed."""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import loguru
import pytest

from trio_idle.core import logs

logger = loguru.logger
DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "operations.md"


@pytest.fixture(autouse=True)
def _restore_sinks() -> Iterator[None]:
    yield
    logs.setup_logging("INFO", "text", show_email=True)
    logger.remove()
    logger.add(sys.stderr)
    logs.protect_secrets(())


@pytest.fixture
def india(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time 5:30 ahead of UTC (no daylight saving), so UTC and local differ."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("india")
def test_json_is_one_flat_object_with_the_documented_fields() -> None:
    stream = io.StringIO()
    logs.setup_logging("INFO", "json", stream)
    log = logs.session_logger("alice@example.test", "c-17", "imap.example.test")
    log.bind(scan_id="3f2a", duration=0.25).info(
        "[idle/alice@example.test] scan-triggered → scanned=12 blocked=1 (scan 3f2a)"
    )
    log.bind(error_kind="timeout").warning("[idle/alice@example.test] connect failed: no answer")
    logger.info("[idle/db] refreshed — 47 active connections, 47 sessions")
    scan, failed, refreshed = _json_lines(stream)
    assert scan == {
        "time": scan["time"],
        "level": "INFO",
        "event": "scan_triggered",
        "component": "session",
        "message": "[idle/alice@example.test] scan-triggered → scanned=12 blocked=1 (scan 3f2a)",
        "connection_id": "c-17",
        "host": "imap.example.test",
        "scan_id": "3f2a",
        "duration": 0.25,
        "email": "alice@example.test",
    }
    # RFC 3339 in UTC, with its offset
    stamp = datetime.datetime.fromisoformat(str(scan["time"]))
    assert stamp.utcoffset() == datetime.timedelta(0) and str(scan["time"]).endswith("+00:00")
    assert (failed["event"], failed["level"], failed["error_kind"]) == (
        "connect_failed",
        "WARNING",
        "timeout",
    )
    assert refreshed == {
        "time": refreshed["time"],
        "level": "INFO",
        "event": "refreshed",
        "component": "db",
        "message": "[idle/db] refreshed — 47 active connections, 47 sessions",
    }
    # flat: no nested objects, and far from loguru's ~1 KB records
    for line in (scan, failed, refreshed):
        assert all(not isinstance(v, dict | list) for v in line.values())
    assert all(len(line) < 400 for line in stream.getvalue().splitlines())


def test_an_attached_exception_is_one_scrubbed_field() -> None:
    stream = io.StringIO()
    logs.setup_logging("INFO", "json", stream)
    logs.protect_secrets(["exc-secret-value"])
    try:
        raise RuntimeError("boom exc-secret-value\nforged line")
    except RuntimeError as exc:
        logger.opt(exception=exc).error("[idle/health] request failed")
    (line,) = _json_lines(stream)
    assert str(line["exception"]).startswith("RuntimeError: boom ********\\x0aforged line (at ")
    assert "exc-secret-value" not in stream.getvalue() and len(stream.getvalue().splitlines()) == 1


@pytest.mark.usefixtures("india")
def test_text_timestamps_carry_their_utc_offset() -> None:
    stream = io.StringIO()
    logs.setup_logging("INFO", "text", stream)
    logger.info("[idle/db] refreshed — 1 active connections, 1 sessions")
    line = stream.getvalue()
    match = re.match(
        r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d) INFO    \[idle/db\]", line
    )
    assert match, line
    offset = datetime.datetime.fromisoformat(match.group(1)).utcoffset()
    assert offset == datetime.timedelta(hours=5, minutes=30)


def test_the_email_is_left_out_unless_allowed() -> None:
    for fmt in ("text", "json"):
        stream = io.StringIO()
        logs.setup_logging("INFO", fmt, stream, show_email=False)
        log = logs.session_logger("bob@example.test", "c-9", "imap.example.test")
        log.info(f"{logs.prefix('bob@example.test')} connected (imap.example.test:993)")
        log.error(
            "[idle/bob@example.test] authentication failed: login rejected for bob@example.test"
        )
        text = stream.getvalue()
        assert "bob@example.test" not in text, fmt
        assert "[idle/#c-9] connected (imap.example.test:993)" in text, fmt
        if fmt == "json":
            assert all("email" not in line for line in _json_lines(stream))
            assert _json_lines(stream)[0]["connection_id"] == "c-9"


def test_a_session_loggers_lines_carry_its_fields_and_name_their_caller() -> None:
    # the session logger binds the connection's fields as each line is written: every
    # level, plain or with more fields bound, gets them, and the record names the code
    # that wrote the line (module, function, line), as a logger bound up front did
    records: list[Any] = []
    logger.remove()
    logger.add(lambda message: records.append(message.record), format="{message}")
    log = logs.session_logger("carol@example.test", "c-3", "imap.example.test")
    log.info("[idle/carol@example.test] connected (imap.example.test:993)")
    log.warning("[idle/carol@example.test] connection lost: EOF")
    log.error("[idle/carol@example.test] authentication failed: NO")
    log.bind(error_kind="tls", connection_id="c-4").warning("[idle/carol@example.test] x")
    fields = {"mailbox": "carol@example.test", "connection_id": "c-3", "host": "imap.example.test"}
    assert [r["extra"] for r in records] == [
        fields,
        fields,
        fields,
        {**fields, "connection_id": "c-4", "error_kind": "tls"},
    ]
    assert [r["level"].name for r in records][:3] == ["INFO", "WARNING", "ERROR"]
    me = sys._getframe().f_code.co_name
    assert all(r["function"] == me and r["name"] == __name__ for r in records)


def test_every_documented_event_name_is_in_the_operations_doc() -> None:
    text = DOCS.read_text()
    for _start, event in logs.EVENTS:
        assert f"`{event}`" in text, event
    for field in ("time", "level", "event", "component", "message", "email", "exception"):
        assert f"`{field}`" in text, field
    for field in logs.JSON_FIELDS:
        assert f"`{field}`" in text, field


# -- the journal ---------------------------------------------------------------------------


def test_journal_stream_must_name_this_descriptor() -> None:
    assert logs.is_journal_stream("8:12345", 8, 12345)
    assert not logs.is_journal_stream("8:12345", 8, 12346)  # inherited, output elsewhere
    assert not logs.is_journal_stream(None, 8, 12345)
    assert not logs.is_journal_stream("8-12345", 8, 12345)
    assert not logs.is_journal_stream(":", 0, 0)


def test_journal_priorities_follow_syslog() -> None:
    ranks = [logs.journal_priority(name, logger.level(name).no) for name in logs.JOURNAL_PRIORITIES]
    assert ranks == [7, 7, 6, 5, 4, 3, 2]
    assert logs.journal_priority("CUSTOM", 45) == 3


def _emit(env: dict[str, str], out: Path, err: Path, fmt: str = "text") -> None:
    code = (
        "import sys; from loguru import logger; from trio_idle.core import logs\n"
        f"logs.setup_logging('DEBUG', {fmt!r})\n"
        "logger.debug('[idle/db] d-line'); logger.info('[idle/db] i-line')\n"
        "logger.warning('[idle/db] w-line'); logger.error('[idle/db] e-line')\n"
        "logger.critical('[idle/db] c-line')\n"
    )
    with out.open("wb") as stdout, err.open("wb") as stderr:
        subprocess.run(
            [sys.executable, "-c", code], env=env, stdout=stdout, stderr=stderr, check=True
        )


def test_lines_to_the_journal_start_with_their_priority(tmp_path: Path) -> None:
    """Under systemd (StandardOutput=journal) both streams are the journal's socket;
    here a file stands in for it: JOURNAL_STREAM names its device and inode."""
    journal = tmp_path / "journal"
    journal.touch()
    st = os.stat(journal)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    # stdout and stderr both the journal, in append mode like one socket
    with journal.open("ab") as both:
        code = (
            "from loguru import logger; from trio_idle.core import logs\n"
            "logs.setup_logging('DEBUG', 'text')\n"
            "logger.debug('d-line'); logger.info('i-line'); logger.success('s-line')\n"
            "logger.warning('w-line'); logger.error('e-line'); logger.critical('c-line')\n"
        )
        subprocess.run([sys.executable, "-c", code], env=env, stdout=both, stderr=both, check=True)
    lines = journal.read_text().splitlines()
    found = {line.split()[-1]: line[: line.index(">") + 1] for line in lines}
    assert found == {
        "d-line": "<7>",
        "i-line": "<6>",
        "s-line": "<5>",
        "w-line": "<4>",
        "e-line": "<3>",
        "c-line": "<2>",
    }


def test_no_priority_prefix_where_the_stream_is_not_the_journal(tmp_path: Path) -> None:
    journal, out, err = tmp_path / "journal", tmp_path / "out", tmp_path / "err"
    journal.touch()
    st = os.stat(journal)
    # inherited JOURNAL_STREAM, but the output was redirected to files
    _emit({**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, out, err, "json")
    lines = out.read_text().splitlines() + err.read_text().splitlines()
    assert len(lines) == 5 and all(line.startswith("{") for line in lines)
    assert [json.loads(line)["level"] for line in lines] == [
        "DEBUG",
        "INFO",
        "WARNING",
        "ERROR",
        "CRITICAL",
    ]
