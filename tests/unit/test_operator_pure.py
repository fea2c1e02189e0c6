"""Pure pieces of the operator commands, the pinger and the loop monitor."""

from __future__ import annotations

import io
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.harness import KEY, row
from trio_idle.core.config import parse_settings
from trio_idle.core.crypto import derive_key
from trio_idle.operator_commands import (
    check_rows,
    decrypt_check_command,
    encrypt_command,
    format_table,
    read_secret,
)
from trio_idle.ops.health import Health
from trio_idle.ops.loop_monitor import LoopMonitor
from trio_idle.ops.pinger import MAX_REASON_CHARS, ping_target

OTHER_KEY = "another-key-0123456789abcdef0123456789"


def test_check_rows_reports_each_row_in_order() -> None:
    rows = [
        row("a", "a@example.test", "pw-a", 993),
        row("b", "b@example.test", "pw-b", 993, key=OTHER_KEY),
        {**row("c", "c@example.test", "pw-c", 993), "imapHost": "bad host!"},
        row("a", "dup@example.test", "pw-d", 143),
    ]
    table, good = check_rows(rows, derive_key(KEY))
    assert [(r.conn_id, r.ok) for r in table] == [
        ("a", True),
        ("b", False),
        ("c", False),
        ("a", False),
    ]
    assert list(good) == ["a"]
    assert table[0].where == "127.0.0.1:993" and table[0].result == "ok (decrypted)"
    assert table[1].email == "b@example.test"
    assert table[1].result.startswith("cannot decrypt encryptedPassword")
    assert table[2].where == "bad host!:993"
    assert table[3].result.startswith("duplicate id")
    text = format_table(table)
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "EMAIL", "HOST:PORT", "RESULT"]
    assert lines[1].endswith("ok (decrypted)") and "FAILED: cannot decrypt" in lines[2]
    assert lines[0].index("HOST:PORT") == lines[1].index("127.0.0.1:993")  # aligned
    for secret in ("pw-a", "pw-b", "pw-c", "pw-d"):
        assert secret not in text


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_read_secret_from_a_pipe_strips_one_newline() -> None:
    assert read_secret(io.StringIO("pw\n")) == "pw"
    assert read_secret(io.StringIO("pw\r\n")) == "pw"
    assert read_secret(io.StringIO("pw\n\n")) == "pw\n"
    assert read_secret(io.StringIO(" pw ")) == " pw "
    with pytest.raises(ValueError, match="empty password"):
        read_secret(io.StringIO("\n"))


def test_read_secret_prompts_twice_on_a_tty() -> None:
    answers = iter(["pw", "pw"])
    assert read_secret(Tty(), lambda prompt: next(answers)) == "pw"
    answers = iter(["pw", "typo"])
    with pytest.raises(ValueError, match="differ"):
        read_secret(Tty(), lambda prompt: next(answers))


def test_encrypt_and_decrypt_check_commands_in_memory() -> None:
    settings = parse_settings({"ENCRYPTION_KEY": KEY}, require=(), require_source=False)
    out, err = io.StringIO(), io.StringIO()
    assert encrypt_command(settings, io.StringIO("s3cret\n"), out, err, iv_size=12) == 0
    token = out.getvalue().strip()
    assert "s3cret" not in out.getvalue() + err.getvalue()
    report = io.StringIO()
    assert decrypt_check_command(settings, io.StringIO(f"x {token}\n"), report) == 0
    assert report.getvalue() == "x: ok\n1 tokens: 1 ok, 0 failed\n"
    empty = io.StringIO()
    assert decrypt_check_command(settings, io.StringIO("\n# nothing\n"), empty) == 1
    assert empty.getvalue() == "no tokens on stdin\n"


def test_ping_target() -> None:
    url = "https://hc-ping.com/uuid"
    assert ping_target(url, "/fail", Health(True)) == url
    failing = Health(False, ("only 1 of 2 sessions are idle or polling (need 90%)", "lag"))
    target = urlsplit(ping_target(url, "/fail", failing))
    assert target.path == "/uuid/fail"
    assert parse_qs(target.query) == {"reason": [failing.summary()]}
    kuma = ping_target("https://kuma/api/push/tok", "?status=down", failing)
    assert parse_qs(urlsplit(kuma).query)["status"] == ["down"]
    long = Health(False, ("x" * 1000,))
    reason = parse_qs(urlsplit(ping_target(url, "/fail", long)).query)["reason"][0]
    assert len(reason) == MAX_REASON_CHARS


def test_loop_monitor_window_and_overdue() -> None:
    m = LoopMonitor(period=0.5, window=2.0, stall_threshold=1.0)
    m.record(10.0, 0.01)
    m.record(10.5, 3.0)
    m.record(11.0, 0.02)
    assert m.lag(11.0) == 3.0
    assert m.lag(12.6) == 0.02  # the 3 s sample left the window
    assert m.lag(13.1) == 0.0
    assert m.stalls == 1 and m.samples == 3 and m.max_lag == 3.0
    m._expected = 20.0  # a wake-up due at 20.0 that has not happened by 24.0
    assert m.lag(24.0) == 4.0
