"""sd_notify protocol pieces: message building, NOTIFY_SOCKET and WATCHDOG_* parsing."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from trio_idle.ops.sd_notify import (
    MAX_STATUS_CHARS,
    Notifier,
    build_message,
    notify_address,
    watchdog_interval,
)


def test_build_message() -> None:
    assert build_message(READY=1) == b"READY=1\n"
    assert build_message(READY=1, STATUS="2/2 up") == b"READY=1\nSTATUS=2/2 up\n"
    assert build_message(STATUS="a\nb\r\nc") == b"STATUS=a b c\n"
    assert build_message(STATUS="x" * 1000) == b"STATUS=" + b"x" * MAX_STATUS_CHARS + b"\n"
    assert build_message(STATUS="é") == "STATUS=é\n".encode()


@pytest.mark.parametrize("bad", [{}, {"ready": 1}, {"READY=": 1}])
def test_build_message_rejects(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        build_message(**bad)


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract/name", "\0abstract/name"),
        ("", None),
        ("@", None),
        ("relative/path", None),
        ("vsock:2:1234", None),
    ],
)
def test_notify_address(value: str, address: str | None) -> None:
    assert notify_address({"NOTIFY_SOCKET": value}) == address


def test_notify_address_unset() -> None:
    assert notify_address({}) is None
    assert Notifier.from_env({}) is None


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "42"}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "43"}, None),  # inherited from a parent
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(env, pid=42) == interval


def test_notifier_sends_datagrams_and_survives_a_missing_listener() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = str(Path(tmp) / "n")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
        assert notifier is not None
        try:
            assert notifier.send(READY=1, STATUS="ok")
            assert receiver.recv(1024) == b"READY=1\nSTATUS=ok\n"
            receiver.close()
            assert not notifier.send(WATCHDOG=1)  # nobody listens: counted, not raised
            assert notifier.errors == 1 and notifier.sent == 1
        finally:
            notifier.close()
