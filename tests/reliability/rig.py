"""The in-process daemon against an :class:`ImapTestServer` and a :class:`ScanBackend`.

Everything lives in the test's trio run: the daemon (``running_daemon``), the IMAP test
server and the backend, so a test can inject a fault and observe both ends without
sleeping. Helpers here wait on events (server state changes, log lines) — callers bound
every wait with :func:`trio.fail_after`.
"""

from __future__ import annotations

from typing import Any

import attrs
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, LogCapture, make_settings, row
from tests.reliability.invariant import Ledger
from trio_idle.core.config import Settings
from trio_idle.mailbox.reconcile import Handle
from trio_idle.runtime.daemon import Daemon

PASSWORD = "S3ntinel-pw-reliability"


def mailbox_name(n: int, prefix: str = "m") -> str:
    return f"{prefix}{n}@rel.test"


@attrs.define
class Rig:
    server: ImapTestServer
    backend: ScanBackend
    logs: LogCapture
    ledger: Ledger

    def add(self, *names: str) -> list[dict[str, Any]]:
        """Create these users on the server; return their connection rows (id = email)."""
        for name in names:
            self.server.add_user(name, PASSWORD)
        return self.rows(*names)

    def rows(self, *names: str) -> list[dict[str, Any]]:
        """Connection rows (id = email = login) for existing users of :attr:`server`."""
        return [row(name, name, PASSWORD, self.server.port) for name in names]

    def source(self, *names: str) -> ListSource:
        """A source listing these users, created on the server first."""
        return ListSource(self.add(*names))

    def settings(self, **env: str) -> Settings:
        """Test settings (see ``make_settings``), plaintext IMAP; ``env`` overrides."""
        return make_settings(self.backend.url, TRIO_IDLE_IMAP_SECURITY="plain", **env)

    # -- waiting -----------------------------------------------------------------------

    async def idle(self, user: str, after: int = 0) -> int:
        """Wait until ``user`` has a connection newer than session id ``after`` in IDLE;
        return its session id."""
        found: list[int] = []

        def check() -> bool:
            found[:] = [s.id for s in self.server.sessions(user) if s.idling and s.id > after]
            return bool(found)

        await self.server.wait_for(check)
        return max(found)

    async def all_idle(self, users: list[str]) -> None:
        wanted = set(users)
        await self.server.wait_for(
            lambda: (
                wanted
                <= {s.user for s in self.server.sessions() if s.idling and s.user is not None}
            )
        )

    async def log(self, text: str, count: int = 1) -> list[str]:
        return await self.logs.wait_for(text, count)

    def handle(self, daemon: Daemon, user: str) -> Handle:
        return daemon.reconciler.handles[user]

    async def quiet(self, daemon: Daemon, user: str) -> None:
        """Wait until ``user``'s scan worker has nothing active or pending.

        Every scan attempt ends with a log line and the worker marks itself done right
        after it (no checkpoint between), so re-checking on each log line is enough.
        """
        coalescer = self.handle(daemon, user).coalescer
        await self.logs.wait_until(lambda: not coalescer.active and not coalescer.pending)
