"""Shared fixtures: a real PostgreSQL, a real Dovecot and the ``node`` binary.

Missing software (no PostgreSQL binaries, no Dovecot, no ``node``) makes the tests that
need it *skip* locally; with ``TRIO_IDLE_REQUIRE_SERVERS=1`` (set by CI) they *fail*
instead, so CI can never go green by silently skipping the real-server tests.  Anything
else that goes wrong while starting a server is an error either way.

Tests that use these fixtures are marked automatically (``postgres``, ``dovecot``,
``node``), so e.g. ``pytest -m "not dovecot"`` deselects them.

Fixtures (all synchronous; use them from trio tests freely):

* ``postgres`` (session) -> :class:`PostgresServer`
* ``pg_dsn`` (function) -> ``str``: DSN of a fresh database with the table
* ``dovecot`` (session) -> :class:`DovecotServer`
* ``dovecot_user`` (function) -> :class:`DovecotUser`: a fresh mailbox user
* ``node_bin`` (session) -> ``str``: path of ``node``
* ``promtool`` (session) -> ``Path``: path of Prometheus' ``promtool``
* ``prometheus_bin`` (session) -> ``Path``: path of ``prometheus`` (see
  :class:`tests.servers.prometheus.PrometheusServer`)
* ``pm2_script`` (session) -> ``Path``: ``pm2`` of the pinned PM2, installed by ``npm ci``
  into a temp prefix (see :mod:`tests.servers.pm2`)
* ``chromium_bin`` (session) -> ``Path``: a headless Chromium (see
  :func:`tests.servers.chromium.dump_dom`)
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import trio

# ``tests`` is a namespace package imported as ``tests.servers``/``tests.harness``.  Only
# ``python -m pytest`` puts the repository root on sys.path; make plain ``pytest`` work too.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from trio_idle_testing.backend import ScanBackend  # noqa: E402

from tests.harness import ADMIN_SECRET, LogCapture, capture_logs  # noqa: E402
from tests.leak_guard import pytest_configure, pytest_runtest_makereport  # noqa: E402, F401
from tests.servers import ServerUnavailable  # noqa: E402
from tests.servers.chromium import find_chromium  # noqa: E402
from tests.servers.dovecot import DovecotServer, DovecotUser  # noqa: E402
from tests.servers.pm2 import install_pm2  # noqa: E402
from tests.servers.postgres import MAIL_CONNECTION_DDL, PostgresServer, execute_sql  # noqa: E402
from tests.servers.prometheus import find_prometheus, find_promtool  # noqa: E402

__all__ = ["REQUIRE_SERVERS_ENV", "servers_required", "unavailable"]

#: Set to ``1`` (CI does) to turn "server/binary missing" skips into failures.
REQUIRE_SERVERS_ENV = "TRIO_IDLE_REQUIRE_SERVERS"

#: Database cloned by ``pg_dsn``; it holds the empty ``"MailConnection"`` table.
PG_TEMPLATE_DB = "trio_idle_template"

_FIXTURE_MARKERS = {
    "postgres": "postgres",
    "pg_dsn": "postgres",
    "dovecot": "dovecot",
    "dovecot_user": "dovecot",
    "node_bin": "node",
    "promtool": "prometheus",
    "prometheus_bin": "prometheus",
    "pm2_script": "pm2",
    "chromium_bin": "chromium",
}
_db_numbers = itertools.count(1)


def servers_required() -> bool:
    """True if ``TRIO_IDLE_REQUIRE_SERVERS`` is set to 1/true/yes."""
    return os.environ.get(REQUIRE_SERVERS_ENV, "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the current test because *reason* (something it needs is missing)...

    ...unless ``TRIO_IDLE_REQUIRE_SERVERS=1``, in which case the test fails with the
    same reason.  The one place that decides between skip and failure.
    """
    if servers_required():
        pytest.fail(f"{reason} [{REQUIRE_SERVERS_ENV}=1: missing servers are failures]")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the real servers they use (``-m "not dovecot"`` etc.)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for marker in sorted({m for f, m in _FIXTURE_MARKERS.items() if f in names}):
            item.add_marker(marker)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A running throwaway PostgreSQL for the whole session, on ``127.0.0.1:<port>``.

    Guarantees: ``postgres.dsn`` (superuser, SCRAM password, TCP) accepts connections;
    a database ``trio_idle_template`` holds an empty ``"MailConnection"`` table.  A test
    may ``stop()``/``start()`` it (same port and data); if a test leaves it stopped, it
    is started again before the next test that uses ``postgres`` or ``pg_dsn``.
    Stopped and deleted at session end.
    """
    try:
        server = PostgresServer()
    except ServerUnavailable as exc:
        unavailable(f"PostgreSQL unavailable: {exc}")
    try:
        server.start()
        template_dsn = server.create_database(PG_TEMPLATE_DB)
        execute_sql(template_dsn, MAIL_CONNECTION_DDL)
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> Iterator[str]:
    """DSN (``postgresql://postgres:<pw>@127.0.0.1:<port>/test_<n>``) of a fresh database.

    Guarantees: the database is new for this test (cloned from the template, so it has
    the empty ``"MailConnection"`` table exactly as the backend's ORM names it) and no
    other test sees its rows.  Dropped after the test (open connections are
    terminated); the server is restarted first if the test left it stopped.
    """
    postgres.start()  # no-op unless an earlier test left it stopped
    name = f"test_{next(_db_numbers)}"
    dsn = postgres.create_database(name, template=PG_TEMPLATE_DB)
    yield dsn
    postgres.start()
    postgres.drop_database(name)


# --------------------------------------------------------------------------- Dovecot


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotServer]:
    """A running throwaway Dovecot for the whole session (see :class:`DovecotServer`).

    Guarantees: ``host`` is 127.0.0.1; ``plain_port`` speaks IMAP with plaintext LOGIN
    and STARTTLS; ``tls_port`` is implicit TLS; ``ca_file`` verifies both; new mail
    reaches IDLE sessions within ~1 s.  A test may ``stop()``/``start()`` it (same ports,
    users and mail); a stopped server is started again before the next test using it.
    Stopped (all Dovecot processes gone) and deleted at session end.
    """
    try:
        server = DovecotServer()
    except ServerUnavailable as exc:
        unavailable(f"Dovecot unavailable: {exc}")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def dovecot_user(dovecot: DovecotServer) -> DovecotUser:
    """A brand-new Dovecot user ``u<random>@example.test`` with a random password.

    Guarantees: Dovecot already accepts the login (checked with ``doveadm auth test``)
    and the mailbox is empty.  ``email`` is also the IMAP login name.
    """
    return dovecot.new_user()


@pytest.fixture(autouse=True)
def _restart_stopped_servers(request: pytest.FixtureRequest) -> None:
    """Start a session server again if an earlier test stopped it and left it down."""
    names = request.fixturenames
    if "postgres" in names or "pg_dsn" in names:
        server: PostgresServer = request.getfixturevalue("postgres")
        server.start()
    if "dovecot" in names or "dovecot_user" in names:
        imap: DovecotServer = request.getfixturevalue("dovecot")
        imap.start()


# --------------------------------------------------------------------------- node


@pytest.fixture(scope="session")
def node_bin() -> str:
    """Absolute path of the ``node`` executable (skip/fail like the servers if missing)."""
    found = shutil.which("node")
    if found is None:
        unavailable("node (Node.js) not found on PATH")
    return found


# --------------------------------------------------------------------------- Prometheus


@pytest.fixture(scope="session")
def promtool() -> Path:
    """Prometheus' ``promtool`` (skip/fail like the servers if missing)."""
    try:
        return find_promtool()
    except ServerUnavailable as exc:
        unavailable(f"promtool unavailable: {exc}")


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """The ``prometheus`` server binary (skip/fail like the servers if missing)."""
    try:
        return find_prometheus()
    except ServerUnavailable as exc:
        unavailable(f"prometheus unavailable: {exc}")


# --------------------------------------------------------------------------- PM2


@pytest.fixture(scope="session")
def pm2_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned PM2 (tests/ops/pm2/package-lock.json), installed once per session by
    ``npm ci`` into a temp prefix: nothing global, nothing in the user's home but npm's
    download cache. Skip/fail like the servers if node, npm or the registry is missing."""
    try:
        return install_pm2(tmp_path_factory.mktemp("pm2-prefix"))
    except ServerUnavailable as exc:
        unavailable(f"PM2 unavailable: {exc}")


# --------------------------------------------------------------------------- Chromium


@pytest.fixture(scope="session")
def chromium_bin() -> Path:
    """A headless Chromium (skip/fail like the servers if missing)."""
    try:
        return find_chromium()
    except ServerUnavailable as exc:
        unavailable(f"chromium unavailable: {exc}")


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Daemons started as subprocesses keep their default SQLite state in a temp dir,
    never in the real ``~/.local/state`` of whoever runs the tests."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture
async def backend(nursery: trio.Nursery) -> ScanBackend:
    """A real HTTP scan backend on 127.0.0.1 that checks the webhook contract."""
    scan_backend = ScanBackend(secret=ADMIN_SECRET)
    await nursery.start(scan_backend.serve)
    return scan_backend


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every loguru message of the test, with ``wait_for`` to wait on a line."""
    with capture_logs() as capture:
        yield capture


@pytest.fixture(autouse=True)
def _unfreeze_gc() -> Iterator[None]:
    """In-process daemons freeze what survives their after-refresh collection
    (``trio_idle.core.gc_policy``); give every test a test process with nothing frozen."""
    yield
    gc.unfreeze()
