"""The process's one asyncio event loop: trio-asyncio's, opened inside trio.

asyncpg runs on it (aioimaplib does not: its parser is fed from trio, no asyncio object exists per
IMAP connection). Its exception handler decides the fate of the errors
asyncio has nobody to hand to: a future whose exception was never retrieved, a callback
that raised. trio-asyncio's default handler re-raises them into the loop's nursery, which
ends the whole daemon, every mailbox with it, because one library left a stray future
behind (asyncpg does, when a query is cancelled at shutdown: ``ConnectionError:
unexpected connection_lost() call``). A fault in one place must not disturb the others,
so :func:`open_asyncio_loop` installs a handler that logs one line and counts it
(``asyncio_errors``) instead. The operation that owned the future has already been told
about its failure through its own await; this is only the leftover.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio_asyncio
from loguru import logger

from trio_idle.core.stats import Stats

#: longest exception text quoted in the log line (library messages can be long)
MAX_TEXT = 200

Handler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]


def describe_asyncio_error(context: dict[str, Any]) -> str:
    """The one log line for an asyncio exception-handler ``context``. Pure.

    Names what asyncio said (``message``) and the exception's type and text; never the
    future's or handle's repr, which can carry arguments (a LOGIN's credentials).
    """
    message = str(context.get("message") or "unhandled error in the asyncio loop")
    exc = context.get("exception")
    if exc is None:
        return f"[idle/asyncio] {message}; counted, carrying on"
    text = str(exc)
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + "…"
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"[idle/asyncio] {message}: {detail}; counted, carrying on"


def make_exception_handler(stats: Stats | None) -> Handler:
    """An asyncio exception handler that logs (warning) and counts, and never raises."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if stats is not None:
            stats.inc("asyncio_errors")
        logger.warning(describe_asyncio_error(context))

    return handle


@asynccontextmanager
async def open_asyncio_loop(stats: Stats | None = None) -> AsyncIterator[None]:
    """Open trio-asyncio's loop for the body, with the logging exception handler.

    Cancellation and exceptions of the body propagate as with ``trio_asyncio.open_loop``;
    on exit the loop is closed and asyncio tasks still on it are cancelled.
    """
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(make_exception_handler(stats))
        yield
