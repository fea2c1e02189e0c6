"""Logging: loguru with the daemon's fixed line formats.

Every line of a session starts with ``[idle/<email>]``, the reconciler's with
``[idle/db]``. The message text is the contract (operators grep for it); the text format
prefixes time and level, the JSON format (one object per line) carries the same message
plus the structured fields bound with :func:`session_logger`.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterable
from typing import Any, Final, TextIO

from loguru import logger

from trio_idle.core.scrub import Scrubber, Scrubs, escape_controls

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"


#: our own lines are not cut like server text, but no line may grow without bound
MAX_LINE_CHARS: Final = 8192

_net = Scrubber(limit=MAX_LINE_CHARS)


def _patch(record: Any) -> None:
    record["message"] = _net.scrub(record["message"])


def protect_secrets(secrets: Iterable[str | None]) -> None:
    """Mask these process-wide secrets in every log line from now on, and make every
    line one printable line (control characters escaped).

    The last line of defence: text from outside is scrubbed where it enters
    (:mod:`trio_idle.core.scrub`); this net also catches the admin secret, the key and the
    database password wherever a library might quote them. Each call replaces the
    previous set (one process, one configuration).
    """
    global _net
    _net = Scrubber(secrets, limit=MAX_LINE_CHARS)
    logger.configure(patcher=_patch)


#: lines at this level and above are the error stream's (console.error); the rest stdout's
ERROR_STREAM_LEVEL: Final = "WARNING"


def setup_logging(
    level: str = "INFO", fmt: str = "text", stream: TextIO | None = None, *, split: bool = True
) -> None:
    """Replace loguru's sinks with ours. Safe to call more than once.

    Where lines go, as the Node daemon's ``console.log`` / ``console.error`` did (PM2's
    ``out_file`` / ``error_file``, see docs/operations.md): with ``split`` (the daemon),
    lines below WARNING on stdout and WARNING and above on stderr, each line on exactly
    one of them, in either format. ``split=False``: every line on stderr (commands whose
    stdout is their report). ``stream``: every line on that one stream (tests).
    Both streams are flushed after each line, so neither lags behind the other.
    """
    logger.configure(patcher=_patch)
    logger.remove()
    options: dict[str, Any] = {"backtrace": False, "diagnose": False}
    if fmt == "json":
        options["serialize"] = True
    else:
        options["format"] = TEXT_FORMAT
    if stream is not None or not split:
        logger.add(stream or sys.stderr, level=level, **options)
    else:
        threshold = logger.level(ERROR_STREAM_LEVEL).no
        logger.add(
            sys.stdout,
            level=level,
            filter=lambda record: record["level"].no < threshold,
            **options,
        )
        logger.add(sys.stderr, level=max(logger.level(level).no, threshold), **options)
    # aioimaplib logs through the stdlib at DEBUG (including raw protocol lines): keep
    # it quiet unless asked, and never below WARNING for asyncio's noise.
    logging.getLogger("aioimaplib").setLevel(logging.WARNING)


def prefix(email: str) -> str:
    """The ``[idle/<email>]`` prefix of a session's lines (the email made printable)."""
    return f"[idle/{escape_controls(email)}]"


def log_internal_error(log: Any, where: str, exc: BaseException, scrub: Scrubs) -> None:
    """One ERROR line for a bug: the scrubbed message plus the traceback's frames.

    The exception's own text goes through ``scrub`` (it may quote a server's answer or a
    command line); loguru's exception rendering would print it raw.
    """
    frames = " > ".join(
        f"{frame.filename.rpartition('/')[2]}:{frame.lineno} {frame.name}"
        for frame in traceback.extract_tb(exc.__traceback__)[-8:]
    )
    log.error(
        f"{where} internal error: {type(exc).__name__}: {scrub.scrub(str(exc))}"
        + (f" (at {frames})" if frames else "")
    )


def session_logger(email: str, connection_id: str) -> Any:
    """A logger whose JSON records carry the connection; text lines carry the prefix."""
    return logger.bind(mailbox=email, connection_id=connection_id)


def human_duration(seconds: float) -> str:
    """``5`` → ``5s``, ``1500`` → ``25min``, ``90`` → ``90s``, ``0.5`` → ``0.5s``."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}min"
    if seconds >= 600:
        return f"{seconds / 60:.0f}min"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.1f}s"
