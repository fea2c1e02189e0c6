"""Helpers for tests that run the real daemon in-process: settings, sources, log capture."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import trio
from loguru import logger

from trio_idle.backend.webhook import ATTEMPT_GRACE, BackendAuth, WebhookClient, backend_http
from trio_idle.core.config import Settings, parse_settings
from trio_idle.core.crypto import derive_key, encrypt_password
from trio_idle.core.errors import SourceError
from trio_idle.core.secret import Secret
from trio_idle.runtime.daemon import Daemon, run_daemon

KEY = "integration-test-key-0123456789abcdef"
ADMIN_SECRET = "test-admin-secret-value"


def make_settings(backend_url: str, **env: str) -> Settings:
    """Settings with every interval shrunk for tests; ``env`` overrides by variable name."""
    base = {
        "ADMIN_SECRET": ADMIN_SECRET,
        "ENCRYPTION_KEY": KEY,
        "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused",
        "BACKEND_URL": backend_url,
        "TRIO_IDLE_REFRESH_INTERVAL": "1h",
        "TRIO_IDLE_TICK_INTERVAL": "1h",
        "TRIO_IDLE_CONNECT_TIMEOUT": "5s",
        "TRIO_IDLE_COMMAND_TIMEOUT": "5s",
        "TRIO_IDLE_LOGOUT_TIMEOUT": "1s",
        "TRIO_IDLE_SHUTDOWN_TIMEOUT": "4s",
        "TRIO_IDLE_BACKOFF_INITIAL": "200ms",
        "TRIO_IDLE_BACKOFF_MAX": "1s",
        "TRIO_IDLE_SCAN_RETRY_INITIAL": "100ms",
        "TRIO_IDLE_SCAN_RETRY_MAX": "500ms",
        "TRIO_IDLE_SCAN_TIMEOUT": "5s",
        "TRIO_IDLE_CONNECT_RATE": "1000",
        "TRIO_IDLE_CONNECT_CONCURRENCY": "50",
        "TRIO_IDLE_LOG_LEVEL": "DEBUG",
        # no persisted state unless a test asks for it (tests/restart/)
        "TRIO_IDLE_STATE": "none",
    }
    base.update(env)
    return parse_settings(base)


def row(
    conn_id: str,
    email: str,
    password: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    login: str | None = None,
    key: str = KEY,
    user_id: str | None = "user-1",
) -> dict[str, Any]:
    """A row as the backend's table holds it (password encrypted like the Node backend)."""
    return {
        "id": conn_id,
        "userId": user_id,
        "email": email,
        "imapHost": host,
        "imapPort": port,
        "imapUser": login,
        "encryptedPassword": encrypt_password(password, derive_key(key)),
    }


class ListSource:
    """An in-memory connection source; set ``fail`` to simulate an outage."""

    name = "db"

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = list(rows or [])
        self.fail = False
        self.fetches = 0

    async def fetch(self) -> list[dict[str, Any]]:
        self.fetches += 1
        if self.fail:
            raise SourceError("simulated outage")
        return [dict(r) for r in self.rows]


class LogCapture:
    """Collects loguru messages; :meth:`wait_for` wakes on each new line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = trio.Event()

    def _sink(self, message: Any) -> None:
        self.lines.append(message.record["message"])
        self._changed.set()

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    async def wait_for(self, text: str, count: int = 1) -> list[str]:
        """Return once ``count`` lines contain ``text``; callers bound it with fail_after."""
        while len(found := self.matching(text)) < count:
            self._changed = trio.Event()
            await self._changed.wait()
        return found

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed = trio.Event()
            await self._changed.wait()

    def text(self) -> str:
        return "\n".join(self.lines)


def restore_stderr_sink() -> None:
    """Give loguru back a sink on stderr after a test replaced the sinks (the CLI does).

    The sink writes to whatever ``sys.stderr`` is at the time: pytest swaps it for each
    test, and a sink bound to one test's capture writes to a closed file later — loguru
    then reports the failed write with the exception being handled, raw server text and
    all, on the real stderr."""
    logger.remove()
    logger.add(lambda message: sys.stderr.write(message))


@contextlib.contextmanager
def capture_logs(level: str = "DEBUG") -> Iterator[LogCapture]:
    capture = LogCapture()
    sink_id = logger.add(capture._sink, level=level, format="{message}")
    try:
        yield capture
    finally:
        logger.remove(sink_id)


#: every daemon :func:`running_daemon` started, so a fixture can check each one's
#: counters after the test (tests/reliability/conftest.py); fixtures clear it
started_daemons: list[Daemon] = []


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings, source: Any) -> AsyncIterator[Daemon]:
    """Run the daemon in a nursery; on exit shut it down gracefully (bounded).

    The daemon is appended to :data:`started_daemons`.
    """
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run_daemon, settings, source)
        started_daemons.append(daemon)
        try:
            yield daemon
        finally:
            daemon.shutdown("test finished")
            with trio.move_on_after(settings.process.shutdown_timeout + 2):
                await daemon.wait_stopped()
            nursery.cancel_scope.cancel()


async def poll_until(predicate: Callable[[], bool], interval: float = 0.05) -> None:
    """For state only observable by asking (e.g. ``doveadm who``). Bound it with fail_after."""
    while not predicate():  # noqa: ASYNC110 - external state offers no event to wait on
        await trio.sleep(interval)


@contextlib.asynccontextmanager
async def serve_process(env: Mapping[str, str], log_path: Path) -> AsyncIterator[trio.Process]:
    """``trio-idle serve`` as a real process, stdout+stderr into ``log_path``.

    Whatever the test does, the process does not outlive the block (killed if running).
    """
    with log_path.open("wb") as log_file:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_idle.cli", "serve"],
            env=dict(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


#: what a transport handler is: httpx.MockTransport's (sync or async)
Handler = Callable[[httpx.Request], Any]
TEST_ADMIN_SECRET = "virtual-admin-secret"


def webhook_client(
    url: str,
    handler: Handler | None = None,
    *,
    secret: str | Secret = TEST_ADMIN_SECRET,
    total_timeout: float = 3600.0,
    max_connections: int = 1,
    **options: Any,
) -> WebhookClient:
    """A :class:`WebhookClient` posting to ``url`` with the ``x-admin-secret`` header:
    over the real network (loopback) or, given ``handler``, to it in memory
    (``httpx.MockTransport``: no sockets, virtual time works). ``options`` go to
    :func:`~trio_idle.backend.webhook.backend_http` (``stats``, ``trust_env``, ...); the
    attempt's grace is the daemon's unless given."""
    options.setdefault("grace", ATTEMPT_GRACE)
    transport = None if handler is None else httpx.MockTransport(handler)
    http = backend_http(total_timeout, max_connections, transport=transport, **options)
    secret = secret if isinstance(secret, Secret) else Secret(secret)
    return WebhookClient(url, BackendAuth("x-admin-secret", secret), http)
