"""A refresh validates, decrypts and parses its rows in a worker thread.

At 10,000 rows that work takes most of a second (docs/performance.md, "Loop stalls"); on
the event loop's thread every IDLE session would wait for it. What is checked here is
where the work runs, not how long it takes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import ListSource, make_settings, row, running_daemon
from trio_idle.accounts import connections, source_file
from trio_idle.accounts.source_file import FileSource


async def test_rows_are_built_outside_the_event_loop_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[bool] = []
    real = connections.build_connection

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(connections, "build_connection", spy)
    # the backend is never called: the one row's server does not exist (port 9)
    source = ListSource([row("c1", "a@example.test", "pw", 9)])
    async with running_daemon(make_settings("http://127.0.0.1:9"), source) as daemon:
        with trio.fail_after(10):
            await daemon.wait_refreshed(after=0)
    assert threads and not any(threads)


async def test_the_file_is_parsed_outside_the_event_loop_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    threads: list[bool] = []
    real = source_file.rows_from_toml

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(source_file, "rows_from_toml", spy)
    path = tmp_path / "connections.toml"
    path.write_text('[[connection]]\nid = "c1"\nemail = "a@example.test"\n')
    rows = await FileSource(str(path), {}).fetch()
    assert [r["id"] for r in rows] == ["c1"] and threads == [False]
