"""A throwaway PostgreSQL server listening on TCP 127.0.0.1, for tests.

Binaries
--------
The bundled binaries of the ``pgserver`` wheel (PostgreSQL 16) are preferred; when the
wheel is not installed the newest ``/usr/lib/postgresql/<major>/bin`` is used.  Only the
*binaries* of pgserver are used, not its ``pgserver.get_server()`` API: that API only
listens on a Unix socket (asyncpg DSNs like ``postgresql://u:p@127.0.0.1:PORT/db`` need
TCP), keeps global state in ``$XDG_RUNTIME_DIR`` and, as root, runs ``useradd pgserver``
and ``chmod o+rx`` on every ancestor of the wheel (including ``/root``).

Root
----
``initdb``/``postgres`` refuse to run as root.  When the tests run as root, every
PostgreSQL process runs as the unprivileged system user ``postgres`` (or ``nobody`` if it
does not exist) via ``subprocess``'s ``user=``/``group=``.  If that user cannot reach the
binaries (pgserver lives under ``/root/.pyenv``, which is mode 0700), the install tree is
mirrored into the server's temp dir with hard links (copies across file systems), keeping
the relative layout the binaries' ``$ORIGIN`` rpath and share-dir lookup rely on.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg

from . import ServerStartError, ServerUnavailable, free_tcp_port, tail

__all__ = [
    "MAIL_CONNECTION_DDL",
    "PostgresInstall",
    "PostgresServer",
    "create_mail_connection_table",
    "execute_sql",
    "fetch_sql",
    "find_postgres_install",
    "run_asyncpg",
]

#: The backend's table, exactly as its ORM names it (quoted camelCase identifiers).
MAIL_CONNECTION_DDL = (
    'CREATE TABLE "MailConnection" ('
    "id text PRIMARY KEY, "
    '"userId" text, '
    "email text NOT NULL, "
    '"imapHost" text NOT NULL, '
    '"imapPort" integer NOT NULL, '
    '"imapUser" text, '
    '"encryptedPassword" text NOT NULL, '
    '"isActive" boolean NOT NULL DEFAULT true)'
)

_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SUBPROCESS_TIMEOUT = 60.0
T = TypeVar("T")


# --------------------------------------------------------------------------- sql helpers


def run_asyncpg(dsn: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Connect to *dsn* with asyncpg, run ``await fn(conn)``, close, return its result.

    Synchronous and blocking.  It runs ``asyncio.run`` in a fresh thread, so it is safe to
    call from anywhere: plain code, sync fixtures, or even inside a running trio /
    trio-asyncio loop (from async tests prefer ``await trio.to_thread.run_sync(...)`` so
    the trio loop is not blocked).
    """

    async def main() -> T:
        conn = await asyncpg.connect(dsn, timeout=30)
        try:
            return await fn(conn)
        finally:
            await conn.close()

    box: list[T] = []
    errors: list[BaseException] = []

    def thread_main() -> None:
        try:
            box.append(asyncio.run(main()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=thread_main, name="run_asyncpg", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


def execute_sql(dsn: str, *statements: str) -> None:
    """Execute each SQL statement (no parameters) on *dsn*, in order, in autocommit mode."""

    async def go(conn: asyncpg.Connection) -> None:
        for statement in statements:
            await conn.execute(statement)

    run_asyncpg(dsn, go)


def fetch_sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query with ``$1``-style *args* on *dsn* and return all rows."""

    async def go(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows

    return run_asyncpg(dsn, go)


def create_mail_connection_table(dsn: str) -> None:
    """Create the backend's ``"MailConnection"`` table in the database *dsn* points to.

    Synchronous (blocking; see :func:`run_asyncpg` for where it may be called).  Uses
    exactly :data:`MAIL_CONNECTION_DDL`; fails if the table already exists.
    """
    execute_sql(dsn, MAIL_CONNECTION_DDL)


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class PostgresInstall:
    """Where the PostgreSQL binaries come from.

    ``tree_roots`` are the directories that must be mirrored together (preserving their
    layout relative to ``tree_base``) when the binaries have to be made reachable for an
    unprivileged user.
    """

    bin_dir: Path
    source: Literal["pgserver", "system", "env"]
    version: str
    tree_base: Path
    tree_roots: tuple[Path, ...]


def find_postgres_install() -> PostgresInstall:
    """Locate PostgreSQL binaries: the pgserver wheel first, then the system packages.

    ``TRIO_IDLE_PG_BINDIR=/path/to/bin`` forces a specific (world-readable) bin dir, e.g.
    ``/usr/lib/postgresql/15/bin`` to exercise the fallback.  Raises
    :class:`ServerUnavailable` if no candidate has ``initdb`` and ``postgres``.
    """
    forced = os.environ.get("TRIO_IDLE_PG_BINDIR")
    if forced:
        bin_dir = Path(forced)
        if not _has_binaries(bin_dir):
            raise ServerUnavailable(f"TRIO_IDLE_PG_BINDIR={forced} has no initdb/postgres")
        return PostgresInstall(
            bin_dir=bin_dir,
            source="env",
            version=_version(bin_dir),
            tree_base=bin_dir.parent,
            tree_roots=(bin_dir,),
        )
    # Locate the wheel without importing it: ``import pgserver`` evaluates platformdirs'
    # runtime dir at class-definition time (a RuntimeDirWarning without XDG_RUNTIME_DIR).
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if _has_binaries(bin_dir):
            pginstall = bin_dir.parent  # .../site-packages/pgserver/pginstall
            site = pginstall.parent.parent
            roots = [pginstall / "bin", pginstall / "lib", pginstall / "share"]
            libs = site / "pgserver.libs"  # auditwheel-vendored libpq ($ORIGIN rpath)
            if libs.is_dir():
                roots.append(libs)
            return PostgresInstall(
                bin_dir=bin_dir,
                source="pgserver",
                version=_version(bin_dir),
                tree_base=site,
                tree_roots=tuple(roots),
            )
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    for bin_dir in candidates:  # world-readable, never needs mirroring
        if _has_binaries(bin_dir):
            return PostgresInstall(
                bin_dir=bin_dir,
                source="system",
                version=_version(bin_dir),
                tree_base=bin_dir.parent,
                tree_roots=(bin_dir,),
            )
    raise ServerUnavailable(
        "no PostgreSQL binaries found: install the 'pgserver' wheel "
        "(pip install -e '.[test]') or the postgresql server package"
    )


def _has_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "postgres"))


def _version(bin_dir: Path) -> str:
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(r"\d+(?:\.\d+)+", out)
    return match.group(0) if match else "unknown"


def _world_reachable(path: Path) -> bool:
    """True if any user can traverse every ancestor of *path* and execute it."""
    path = path.resolve()
    for parent in path.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IXOTH)


def _mirror_tree(install: PostgresInstall, dest: Path) -> Path:
    """Hard-link (or copy) the install tree under *dest*; return the mirrored bin dir."""
    for root in install.tree_roots:
        for dirpath, _dirnames, filenames in os.walk(root):
            src_dir = Path(dirpath)
            dst_dir = dest / src_dir.relative_to(install.tree_base)
            dst_dir.mkdir(parents=True, exist_ok=True)
            dst_dir.chmod(0o755)
            for name in filenames:
                src, dst = src_dir / name, dst_dir / name
                if src.is_symlink():
                    os.symlink(os.readlink(src), dst)
                    continue
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
                if not dst.stat().st_mode & stat.S_IROTH:
                    dst.chmod(dst.stat().st_mode | stat.S_IRGRP | stat.S_IROTH)
    return dest / install.bin_dir.relative_to(install.tree_base)


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerUnavailable(
        "running as root, but neither a 'postgres' nor a 'nobody' system user exists "
        "to run PostgreSQL as (initdb/postgres refuse to run as root)"
    )


# --------------------------------------------------------------------------- the server


class PostgresServer:
    """A private PostgreSQL cluster in a temp dir, reachable at ``127.0.0.1:<port>``.

    ``start()`` runs ``initdb`` on first use (superuser ``postgres`` with a random
    password, SCRAM auth on TCP, no Unix socket) and then runs ``postgres`` as a child
    process of this Python process; ``stop()`` shuts it down keeping data and port, so
    ``start()`` brings the same cluster back on the same port.  ``cleanup()`` stops it
    and deletes the temp dir.  Durability settings (``fsync`` & co.) are off for speed:
    data survives ``stop()`` of any mode, but not a machine crash.

    Raises :class:`ServerUnavailable` (from the constructor) if no binaries are found,
    :class:`ServerStartError` if ``initdb`` or ``postgres`` fail.
    """

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, base_dir: Path | None = None, *, max_connections: int = 300) -> None:
        self.install = find_postgres_install()
        self.password = secrets.token_hex(12)
        self.max_connections = max_connections
        self._owns_base_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="trio-idle-pg-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.port = free_tcp_port(self.host)
        self._initialized = False
        self._lock = threading.Lock()
        self._run_as: pwd.struct_passwd | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.bin_dir = self.install.bin_dir
        if os.geteuid() == 0:
            self._run_as = _unprivileged_user()
            self.base_dir.chmod(0o755)
            os.chown(self.base_dir, self._run_as.pw_uid, self._run_as.pw_gid)
            if not _world_reachable(self.bin_dir / "postgres"):
                self.bin_dir = _mirror_tree(self.install, self.base_dir / "pgbin")
        atexit.register(self._atexit)

    # -- addresses -------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """libpq/asyncpg URL of the ``postgres`` database, e.g. for admin statements."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """libpq/asyncpg URL of *database* on this server (superuser credentials)."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    @property
    def run_as_user(self) -> str:
        """System user the PostgreSQL processes run as."""
        if self._run_as is not None:
            return self._run_as.pw_name
        return pwd.getpwuid(os.geteuid()).pw_name

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (running ``initdb`` first if needed); a no-op if it runs.

        Blocks until PostgreSQL accepts connections.  On the very first start a port
        that was stolen in the meantime is replaced by a fresh one; later starts reuse
        the same port and fail instead (callers rely on the DSN staying valid).
        """
        with self._lock:
            if not self._initialized:
                self._initdb()
                self._initialized = True
                for attempt in range(3):
                    try:
                        self._spawn_postgres()
                        return
                    except ServerStartError:
                        if attempt == 2 or "could not bind" not in tail(self.log_path, 500):
                            raise
                        self.port = free_tcp_port(self.host)
                        self._write_conf()
            elif not self._is_running():
                self._spawn_postgres()

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server, keeping its data and port; a no-op if it is not running.

        ``fast`` (default) disconnects clients and shuts down cleanly; ``immediate``
        simulates a crash (the next start does crash recovery); ``smart`` waits for
        clients to disconnect.
        """
        signum = {
            "smart": signal.SIGTERM,
            "fast": signal.SIGINT,
            "immediate": signal.SIGQUIT,
        }[mode]
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                proc.send_signal(signum)
                try:
                    proc.wait(timeout=_SUBPROCESS_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._kill()
                    raise ServerStartError(
                        f"postgres did not stop ({mode}) within {_SUBPROCESS_TIMEOUT}s; killed"
                    ) from None
            self._proc = None

    @property
    def is_running(self) -> bool:
        """True if the postmaster of this cluster is alive."""
        with self._lock:
            return self._initialized and self._is_running()

    def cleanup(self) -> None:
        """Stop the server (``immediate``) and delete its temp dir (if we created it)."""
        self.stop("immediate")
        atexit.unregister(self._atexit)
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- databases -------------------------------------------------------------------

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """``CREATE DATABASE name [TEMPLATE template]`` and return the new DSN.

        Names must be lower-case SQL identifiers (``[a-z_][a-z0-9_]*``).  A template must
        have no open connections while it is being copied.
        """
        for ident in (name, template):
            if ident is not None and not _DB_NAME.match(ident):
                raise ValueError(f"not a plain lower-case database name: {ident!r}")
        statement = f"CREATE DATABASE {name}"
        if template is not None:
            statement += f" TEMPLATE {template}"
        execute_sql(self.dsn, statement)
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS name WITH (FORCE)`` (kicks out open connections)."""
        if not _DB_NAME.match(name):
            raise ValueError(f"not a plain lower-case database name: {name!r}")
        execute_sql(self.dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    # -- internals -------------------------------------------------------------------

    def _run(self, cmd: Sequence[str], what: str) -> None:
        env = self._env()
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    list(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    cwd=self.base_dir,
                    env=env,
                    timeout=_SUBPROCESS_TIMEOUT,
                    check=False,
                    **kwargs,
                )
            except subprocess.TimeoutExpired as exc:
                raise ServerStartError(
                    f"{what} timed out after {_SUBPROCESS_TIMEOUT}s\n{tail(self.log_path)}"
                ) from exc
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            raise ServerStartError(
                f"{what} failed with exit code {proc.returncode}: {output}\n"
                f"--- {self.log_path} ---\n{tail(self.log_path)}"
            )

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        if self._run_as is not None:
            env.update(HOME=str(self.base_dir), USER=self._run_as.pw_name)
        return env

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _initdb(self) -> None:
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        try:
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.user,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        postgresql_conf = self.data_dir / "postgresql.conf"
        with postgresql_conf.open("a") as f:
            f.write("\ninclude 'trio_idle.conf'\n")
        self._write_conf()

    def _write_conf(self) -> None:
        conf = self.data_dir / "trio_idle.conf"
        conf.write_text(
            "# written by tests/servers/postgres.py\n"
            f"listen_addresses = '{self.host}'\n"
            f"port = {self.port}\n"
            "unix_socket_directories = ''\n"
            f"max_connections = {self.max_connections}\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "timezone = 'UTC'\n"
        )
        self._chown(conf)

    def _spawn_postgres(self) -> None:
        """Run ``postgres -D data`` as our child and wait until it reports ``ready``.

        Not ``pg_ctl start``: that daemonizes the postmaster, which is then reparented to
        PID 1 (left as a zombie where PID 1 does not reap).  As our child it is reaped
        by :meth:`stop`, and a crash during start-up is noticed immediately.
        """
        pid_file = self.data_dir / "postmaster.pid"
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self._env(),
                start_new_session=True,  # Ctrl-C in the terminal must not hit it first
                **kwargs,
            )
        deadline = time.monotonic() + _SUBPROCESS_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise ServerStartError(
                    f"postgres exited during start-up\n--- {self.log_path} ---\n"
                    f"{tail(self.log_path)}"
                )
            try:
                lines = pid_file.read_text().splitlines()
            except OSError:
                lines = []
            if (
                len(lines) >= 8
                and lines[0].strip() == str(self._proc.pid)
                and lines[7].strip() == "ready"
            ):
                return
            time.sleep(0.02)
        self._kill()
        raise ServerStartError(
            f"postgres not ready after {_SUBPROCESS_TIMEOUT}s\n{tail(self.log_path)}"
        )

    def _is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _atexit(self) -> None:
        """Interpreter exit without :meth:`cleanup` (e.g. Ctrl-C): leave nothing behind."""
        with contextlib.suppress(Exception):
            self.cleanup()

    def __repr__(self) -> str:
        return (
            f"<PostgresServer {self.host}:{self.port} {self.install.source} "
            f"{self.install.version} as {self.run_as_user} in {self.base_dir}>"
        )


_INSERT_MAIL_CONNECTION = (
    'INSERT INTO "MailConnection" (id, "userId", email, "imapHost", "imapPort", "imapUser", '
    '"encryptedPassword") VALUES ($1, $2, $3, $4, $5, $6, $7)'
)
_ROW_COLUMNS = ("id", "userId", "email", "imapHost", "imapPort", "imapUser", "encryptedPassword")


def insert_mail_connections(dsn: str, *rows: dict[str, Any]) -> None:
    """Insert rows (dicts with the table's column names, e.g. ``tests.harness.row``).

    Synchronous and blocking, like :func:`execute_sql`.
    """

    async def go(conn: asyncpg.Connection) -> None:
        for r in rows:
            await conn.execute(_INSERT_MAIL_CONNECTION, *(r[c] for c in _ROW_COLUMNS))

    run_asyncpg(dsn, go)
