"""The asyncio loop's leftovers (a future's exception nobody retrieved) are logged and
counted, and never end the daemon's loop."""

from __future__ import annotations

import asyncio
import gc

import trio

from tests.harness import capture_logs
from trio_idle.core.stats import Stats
from trio_idle.imap.asyncio_loop import describe_asyncio_error, open_asyncio_loop


async def test_an_unretrieved_future_exception_is_logged_and_counted_not_raised() -> None:
    stats = Stats()
    with capture_logs() as logs, trio.fail_after(5):
        async with open_asyncio_loop(stats):
            loop = asyncio.get_event_loop()
            future = loop.create_future()
            future.set_exception(ConnectionError("unexpected connection_lost() call"))
            del future  # asyncio reports it from the future's finaliser
            gc.collect()
            while stats.get("asyncio_errors") == 0:  # noqa: ASYNC110 - the handler has no event
                await trio.sleep(0.01)
            # the loop is still usable afterwards
            assert await trio.to_thread.run_sync(lambda: 42) == 42
    assert stats.get("asyncio_errors") == 1
    assert logs.matching(
        "[idle/asyncio] Future exception was never retrieved: "
        "ConnectionError: unexpected connection_lost() call; counted, carrying on"
    )


def test_the_line_never_quotes_the_future_or_handle() -> None:
    class Handle:
        def __repr__(self) -> str:
            return "<Handle login('user', 'hunter2')>"

    context = {"message": "Exception in callback", "exception": ValueError(), "handle": Handle()}
    line = describe_asyncio_error(context)
    assert line == "[idle/asyncio] Exception in callback: ValueError; counted, carrying on"
    long = describe_asyncio_error({"message": "m", "exception": OSError("x" * 1000)})
    assert len(long) < 300 and long.endswith("…; counted, carrying on")
    assert describe_asyncio_error({}) == (
        "[idle/asyncio] unhandled error in the asyncio loop; counted, carrying on"
    )
