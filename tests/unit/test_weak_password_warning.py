"""The daemon warns once per process about a connection whose password is too short to be
masked safely in server text: one line when it first appears, nothing on later refreshes,
one more line naming only a connection that is new."""

from __future__ import annotations

import trio

from tests.harness import ListSource, capture_logs, make_settings, row, running_daemon

WARNING = "have a password shorter than"


async def test_a_weak_password_is_warned_about_once_per_connection() -> None:
    # the backend is never called: the rows' server does not exist (port 9)
    source = ListSource([row("c1", "a@example.test", "pw", 9)])
    with capture_logs("WARNING") as logs:
        async with running_daemon(make_settings("http://127.0.0.1:9"), source) as daemon:
            with trio.fail_after(10):
                await daemon.wait_refreshed(after=0)
                for after in (1, 2):
                    daemon.request_refresh()
                    await daemon.wait_refreshed(after=after)
                assert [line for line in logs.matching(WARNING) if "(c1)" in line]
                assert len(logs.matching(WARNING)) == 1
                source.rows.append(row("c2", "b@example.test", "pw2", 9))
                daemon.request_refresh()
                await daemon.wait_refreshed(after=3)
                daemon.request_refresh()
                await daemon.wait_refreshed(after=4)
    warnings = logs.matching(WARNING)
    assert len(warnings) == 2, warnings
    assert "(c2)" in warnings[1]
