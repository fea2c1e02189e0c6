"""A logger for tests that records its lines: hand it where the daemon takes a
:class:`~trio_idle.core.logs.Logger` (a session, a scan worker, the ticker) and read back
what was logged, level by level.

It satisfies the protocol by its own methods, not by catching any attribute, so mypy
checks it against :class:`~trio_idle.core.logs.Logger` (below): a logger method the daemon
starts to use is a method this fake must grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trio_idle.core.logs import Logger


class RecordingLog:
    """Records ``(level, line)``; structured fields (:meth:`bind`) are not recorded."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def bind(self, **fields: Any) -> RecordingLog:
        return self

    def info(self, message: str, /) -> None:
        self.lines.append(("info", message))

    def warning(self, message: str, /) -> None:
        self.lines.append(("warning", message))

    def error(self, message: str, /) -> None:
        self.lines.append(("error", message))

    def texts(self, level: str | None = None) -> list[str]:
        """The lines logged (at ``level`` only, if given), in order."""
        return [text for lv, text in self.lines if level is None or lv == level]


if TYPE_CHECKING:
    _satisfies_the_protocol: Logger = RecordingLog()
