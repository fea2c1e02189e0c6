"""Where log lines go: the daemon splits them like the Node daemon's console.log /
console.error (PM2's out and error logs), each line on exactly one stream."""

from __future__ import annotations

import json
from collections.abc import Iterator

import loguru
import pytest

from tests.harness import restore_stderr_sink
from trio_idle.core import logs

logger = loguru.logger


@pytest.fixture(autouse=True)
def _restore_sinks() -> Iterator[None]:
    yield
    restore_stderr_sink()  # the CLI replaced the sinks
    logs.protect_secrets(())


def _emit_one_of_each() -> None:
    logger.debug("d-line")
    logger.info("i-line")
    logger.success("s-line")
    logger.warning("w-line")
    logger.error("e-line")
    logger.critical("c-line")


def _names(text: str) -> list[str]:
    return [word for line in text.splitlines() for word in line.split() if word.endswith("-line")]


def test_below_warning_on_stdout_warning_and_above_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.setup_logging("INFO", "text")
    _emit_one_of_each()
    out, err = capsys.readouterr()
    assert _names(out) == ["i-line", "s-line"]  # DEBUG is below the level: nowhere
    assert _names(err) == ["w-line", "e-line", "c-line"]
    assert "INFO" in out and "WARNING" in err  # the text format is unchanged


def test_the_level_still_applies_to_both_streams(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("DEBUG", "text")
    _emit_one_of_each()
    out, err = capsys.readouterr()
    assert _names(out) == ["d-line", "i-line", "s-line"]
    assert _names(err) == ["w-line", "e-line", "c-line"]
    logs.setup_logging("ERROR", "text")
    _emit_one_of_each()
    out, err = capsys.readouterr()
    assert out == "" and _names(err) == ["e-line", "c-line"]


def test_json_lines_split_the_same_way(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("INFO", "json")
    _emit_one_of_each()
    out, err = capsys.readouterr()
    levels = {
        name: [json.loads(line)["level"] for line in text.splitlines()]
        for name, text in (("out", out), ("err", err))
    }
    assert levels == {"out": ["INFO", "SUCCESS"], "err": ["WARNING", "ERROR", "CRITICAL"]}


def test_without_split_every_line_is_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    # `check` and `serve --once`: stdout carries the report and nothing else
    logs.setup_logging("INFO", "text", split=False)
    _emit_one_of_each()
    out, err = capsys.readouterr()
    assert out == ""
    assert _names(err) == ["i-line", "s-line", "w-line", "e-line", "c-line"]


def test_the_secret_mask_covers_both_streams(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("INFO", "text")
    logs.protect_secrets(["hunter2-stream-secret"])
    logger.info("info hunter2-stream-secret")
    logger.error("error hunter2-stream-secret")
    out, err = capsys.readouterr()
    assert "info " in out and "error " in err
    assert "hunter2-stream-secret" not in out + err
