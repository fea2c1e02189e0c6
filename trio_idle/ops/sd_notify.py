"""systemd ``Type=notify`` support, speaking the datagram protocol directly (no libsystemd).

The protocol (``sd_notify(3)``): newline-separated ``KEY=VALUE`` assignments in one
datagram sent to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``. A name starting with
``@`` is in the abstract namespace (``@`` stands for a leading NUL byte).

Message building and environment parsing are pure (:func:`build_message`,
:func:`notify_address`, :func:`watchdog_interval`). :class:`Notifier` sends without ever
blocking or raising: a supervisor that stopped listening costs a logged warning, not the
daemon. When ``NOTIFY_SOCKET`` is unset nothing here does anything.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Final

from loguru import logger

MAX_STATUS_CHARS: Final = 400


def build_message(**fields: str | int) -> bytes:
    """``build_message(READY=1, STATUS="3 up")`` → ``b"READY=1\\nSTATUS=3 up\\n"``.

    Keys keep their order; newlines in values become spaces (a value cannot span lines).
    """
    if not fields:
        raise ValueError("a notification needs at least one field")
    lines = []
    for key, value in fields.items():
        if not key.isidentifier() or not key.isupper():
            raise ValueError(f"invalid notification key {key!r}")
        text = " ".join(str(value).splitlines())
        if key == "STATUS":
            text = text[:MAX_STATUS_CHARS]
        lines.append(f"{key}={text}\n")
    return "".join(lines).encode("utf-8")


def notify_address(env: Mapping[str, str]) -> str | None:
    """The socket address from ``$NOTIFY_SOCKET``: a path, or ``"\\0name"`` for ``@name``.

    ``None`` when unset, empty, or not an ``AF_UNIX`` address (``vsock:`` is not supported).
    """
    value = env.get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``.

    ``None`` when the watchdog is off: unset or invalid ``WATCHDOG_USEC``, or a
    ``WATCHDOG_PID`` naming another process (the variables were inherited).
    """
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "").strip())
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """A non-blocking datagram socket to the supervisor. Never raises from :meth:`send`."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent = 0
        self.errors = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Notifier | None:
        address = notify_address(env)
        return None if address is None else cls(address)

    def send(self, **fields: str | int) -> bool:
        """Send one notification; returns whether the datagram went out."""
        try:
            self._sock.sendto(build_message(**fields), self.address)
        except OSError as exc:
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                logger.warning(
                    f"[idle/systemd] notification to NOTIFY_SOCKET failed: "
                    f"{exc.strerror or exc} ({self.errors} failures so far)"
                )
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close()
