"""Refreshes of the file source against live sessions: an unchanged file restarts
nothing (and is not parsed again); an edited entry restarts only its session; a removed
entry closes its session; the refresh line still counts every connection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import running_daemon
from tests.reliability.rig import PASSWORD, Rig, mailbox_name
from trio_idle.accounts import source_file
from trio_idle.accounts.source_file import FileSource
from trio_idle.runtime.daemon import Daemon


def entries(rig: Rig, names: list[str], user_ids: dict[str, str]) -> str:
    return "\n".join(
        f'[[connection]]\nid = "{n}"\nemail = "{n}"\nimap_host = "127.0.0.1"\n'
        f'imap_port = {rig.server.port}\nimap_security = "plain"\npassword_env = "PW"\n'
        f'user_id = "{user_ids.get(n, "u")}"\n'
        for n in names
    )


async def refresh(daemon: Daemon) -> None:
    attempts = daemon.status().refresh_attempts
    daemon.request_refresh()
    with trio.fail_after(10):
        await daemon.wait_refreshed(after=attempts)


def session_ids(rig: Rig, name: str) -> list[int]:
    return [s.id for s in rig.server.sessions(name)]


async def test_file_refreshes_restart_only_what_changed(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [mailbox_name(i, "file") for i in range(3)]
    rig.add(*names)
    path = tmp_path / "connections.toml"
    path.write_text(entries(rig, names, {}))
    parses: list[int] = []
    real = source_file.rows_from_toml

    def counted(*args: Any) -> Any:
        parses.append(1)
        return real(*args)

    monkeypatch.setattr(source_file, "rows_from_toml", counted)
    source = FileSource(str(path), {"PW": PASSWORD})
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.all_idle(names)
        before = {n: session_ids(rig, n) for n in names}
        conns = {n: rig.handle(daemon, n).conn for n in names}
        assert parses == [1]

        await refresh(daemon)  # nothing changed
        assert parses == [1]
        await rig.log("refreshed — 3 active connections, 3 sessions", count=2)
        assert {n: rig.handle(daemon, n).conn for n in names} == conns
        assert all(rig.handle(daemon, n).conn is conns[n] for n in names)

        # one entry edited, one removed
        path.write_text(entries(rig, names[:2], {names[1]: "moved-user"}))
        await refresh(daemon)
        assert parses == [1, 1]
        with trio.fail_after(10):
            await rig.idle(names[1], after=max(before[names[1]]))
            await rig.server.wait_for(lambda: not rig.server.sessions(names[2]))
        await rig.log("refreshed — 2 active connections, 2 sessions")
        assert rig.handle(daemon, names[1]).conn.user_id == "moved-user"
        assert session_ids(rig, names[0]) == before[names[0]]  # untouched
        assert rig.handle(daemon, names[0]).conn is conns[names[0]]
