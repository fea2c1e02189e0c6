"""Logging: loguru with the daemon's fixed line formats.

Every line of a session starts with ``[idle/<email>]``, the reconciler's with
``[idle/db]``. The message text is the contract (operators grep for it); the text format
prefixes time and level, the JSON format (one object per line) carries the same message
plus the structured fields bound with :func:`session_logger`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from loguru import logger

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"


def setup_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Replace loguru's default sink with ours. Safe to call more than once."""
    logger.remove()
    sink = stream or sys.stderr
    if fmt == "json":
        logger.add(sink, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(sink, level=level, format=TEXT_FORMAT, backtrace=False, diagnose=False)
    # aioimaplib logs through the stdlib at DEBUG (including raw protocol lines): keep
    # it quiet unless asked, and never below WARNING for asyncio's noise.
    logging.getLogger("aioimaplib").setLevel(logging.WARNING)


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
