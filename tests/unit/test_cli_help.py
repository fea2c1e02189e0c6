"""Each command's ``--help`` lists the options that command reads, under one heading per
settings group: ``check --help`` does not drown its flags in the daemon's."""

from __future__ import annotations

import pytest

from trio_idle import cli
from trio_idle.core.config import OPTIONS


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"], {})
    return capsys.readouterr().out


def flags(text: str) -> set[str]:
    return {word.rstrip(",") for word in text.split() if word.startswith("--")}


def test_check_lists_only_what_check_reads(capsys: pytest.CaptureFixture[str]) -> None:
    serve, check = help_text("serve", capsys), help_text("check", capsys)
    # the daemon's own: health port, pings, scans, cluster, GC
    daemon_only = {"--health-addr", "--ping-interval", "--scan-timeout", "--cluster", "--gc"}
    assert daemon_only <= flags(serve)
    assert not daemon_only & flags(check)
    # what a LOGIN and the list need
    assert {"--source", "--imap-security", "--connect-timeout", "--login", "--env-file"} <= flags(
        check
    )
    assert len(check.splitlines()) < len(serve.splitlines()) * 2 // 3


@pytest.mark.parametrize("command", ["encrypt", "decrypt", "db"])
def test_small_commands_list_only_their_own(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(command, capsys)
    settings = {o.flag for o in OPTIONS if o.flag} & flags(text)
    assert "--log-level" in settings and "--env-file" in flags(text)
    assert "--source" not in settings and "--health-addr" not in settings


def test_options_are_grouped_under_their_settings_group(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_text("check", capsys)
    logging = text.index("What is logged and in which format")
    imap = text.index("How each IMAP session connects")
    # (the usage line at the top names every flag once: look past it)
    assert imap < text.index("  --imap-security", imap) < logging
    assert logging < text.index("  --log-level", imap)
