"""A throwaway Dovecot IMAP server (real ``/usr/sbin/dovecot``) for tests.

Everything lives in one temp dir: the generated ``dovecot.conf``, ``base_dir`` (sockets,
so it never clashes with a system Dovecot), ``state_dir``, the log, a trustme CA plus a
server certificate for ``localhost``/``127.0.0.1``, one ``passwd-file`` per user and the
maildirs.  The master runs in the foreground (``dovecot -F``) as a child of this Python
process in its own process group, so :meth:`DovecotServer.stop` can wait for every
Dovecot process to be gone.

Users
-----
Each user has its own passwd-file (``users/<user>``, ``{PLAIN}`` password), selected via
``%u`` in the passdb/userdb path.  Reason: Dovecot's passwd-file driver stats a file at
most once per second and detects changes by mtime (whole seconds) + size, so edits to one
shared file can stay invisible for a while.  A new user means a new file, which Dovecot
reads on first lookup; password changes bump the mtime to a new second, and every
``add_user``/``set_password``/``remove_user`` returns only after ``doveadm auth``
confirms Dovecot sees the change (``set_password`` therefore takes up to ~1 s).  All
virtual users map to one system uid (``nobody`` when run as root, the current user
otherwise).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import grp
import imaplib
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import trio
import trustme

from . import ServerStartError, ServerUnavailable, free_tcp_port, tail

__all__ = ["DovecotServer", "DovecotUser", "find_dovecot"]

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@-]{0,200}$")
_BAD_PASSWORD_CHARS = frozenset(":\r\n\t\0")
_TIMEOUT = 30.0
_EX_NOUSER = 67  # sysexits.h, as used by doveadm auth
_EX_NOPERM = 77


@dataclass(frozen=True)
class DovecotUser:
    """A mailbox on the test Dovecot; ``email`` is also the IMAP login name."""

    email: str
    password: str


def find_dovecot() -> tuple[Path, Path]:
    """Return ``(dovecot, doveadm)`` paths or raise :class:`ServerUnavailable`."""
    found: list[Path] = []
    for name, fallback in (("dovecot", "/usr/sbin/dovecot"), ("doveadm", "/usr/bin/doveadm")):
        path = shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)
        if path is None:
            raise ServerUnavailable(f"{name!r} not found (install the dovecot-imapd package)")
        found.append(Path(path))
    return found[0], found[1]


def _system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ServerUnavailable(
            f"system user {name!r} is missing (normally created by the dovecot-core package)"
        ) from None


class DovecotServer:
    """A private Dovecot on ``127.0.0.1`` with a plaintext+STARTTLS and an implicit-TLS port.

    Guarantees once :meth:`start` returns: both ports accept connections and greet with
    ``* OK``; ``ca_file`` verifies the server certificate (SANs ``localhost`` and
    ``127.0.0.1``); plaintext ``LOGIN``/``AUTHENTICATE PLAIN`` are allowed on the plain
    port (``disable_plaintext_auth = no``) which also offers ``STARTTLS``; failed logins
    answer after ~0.5 s (``auth_failure_delay = 0``; Dovecot flushes failures on a 0.5 s
    timer) and never get slower (anvil's auth penalty is disabled); new mail is noticed
    by IDLE sessions within ~1 s (``mailbox_idle_check_interval = 1 secs``).

    ``stop()``/``start()`` may be repeated; ports, users and mail are kept.
    ``cleanup()`` stops and deletes the temp dir.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        oauth2_introspection_url: str | None = None,
        extra_config: str = "",
    ) -> None:
        #: with a URL: OAuth2 (XOAUTH2/OAUTHBEARER) tokens are checked by POSTing them there
        #: (``token=<token>&...``, answered ``{"active": true, "username": "<user>"}``);
        #: password logins keep working (passwd-file passdb for PLAIN/LOGIN)
        self.oauth2_introspection_url = oauth2_introspection_url
        #: appended to the generated dovecot.conf (``mailbox_list_index = yes``, ...)
        self.extra_config = extra_config
        self.dovecot_bin, self.doveadm_bin = find_dovecot()
        self._owns_base_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="trio-idle-dovecot-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)  # auth (dovecot user) must reach users/
        self.config_path = self.base_dir / "dovecot.conf"
        self.log_path = self.base_dir / "dovecot.log"
        self.stderr_path = self.base_dir / "dovecot.stderr"
        self.users_dir = self.base_dir / "users"
        self.mail_dir = self.base_dir / "mail"
        self.instance_name = f"trio-idle-{secrets.token_hex(4)}"
        self.plain_port = free_tcp_port(self.host)
        self.tls_port = free_tcp_port(self.host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._users_mtime = 0

        if os.geteuid() == 0:
            self.login_user = _system_user("dovenull").pw_name
            self.internal_user = _system_user("dovecot").pw_name
            mail = pwd.getpwnam("nobody") if _has_user("nobody") else _system_user("dovecot")
        else:
            mail = pwd.getpwuid(os.geteuid())
            self.login_user = self.internal_user = mail.pw_name
        self.mail_uid, self.mail_gid = mail.pw_uid, mail.pw_gid

        self.users_dir.mkdir(mode=0o755, exist_ok=True)
        self.mail_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.mail_dir, self.mail_uid, self.mail_gid)

        ca = trustme.CA(organization_name="trio-idle test CA")
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = self.base_dir / "ca.pem"
        self.cert_file = self.base_dir / "server-cert.pem"
        self.key_file = self.base_dir / "server-key.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(self.key_file))
        with self.cert_file.open("wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        self.key_file.chmod(0o600)
        self._write_config()
        atexit.register(self._atexit)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start Dovecot and wait until both ports greet; a no-op if it is running.

        A port stolen between choosing and binding it is replaced by a fresh one only
        on the very first start; restarts keep the ports (clients rely on them).
        """
        with self._lock:
            if self._is_running():
                return
            first = not self.log_path.exists()
            attempts = 3 if first else 1
            for attempt in range(attempts):
                try:
                    self._spawn()
                    return
                except ServerStartError:
                    if attempt == attempts - 1 or "Address already in use" not in (
                        tail(self.log_path) + tail(self.stderr_path)
                    ):
                        raise
                    self.plain_port = free_tcp_port(self.host)
                    self.tls_port = free_tcp_port(self.host)
                    self._write_config()

    def stop(self) -> None:
        """Stop Dovecot (SIGTERM; clients are disconnected) and wait for all its processes.

        Users, mail and ports are kept for a later :meth:`start`.  No-op if not running.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            pgid = proc.pid
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    proc.wait()
            self._proc = None
            # The master is gone; its children (log, login, imap ...) exit right after.
            # Wait for them: lingering imap-login processes still hold the listeners.
            deadline = time.monotonic() + _TIMEOUT
            while _process_group_alive(pgid):
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    break
                time.sleep(0.02)

    @property
    def is_running(self) -> bool:
        """True if the Dovecot master process is alive."""
        with self._lock:
            return self._is_running()

    def reload(self) -> None:
        """``doveadm reload``: re-read the config (existing sessions are kept)."""
        self.doveadm("reload")

    def cleanup(self) -> None:
        """Stop Dovecot and delete its temp dir (if this object created it)."""
        self.stop()
        atexit.unregister(self._atexit)
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- users -----------------------------------------------------------------------

    def add_user(self, user: str, password: str) -> None:
        """Create (or overwrite) a mailbox user; returns once Dovecot accepts the login."""
        self._write_user(user, password)

    def set_password(self, user: str, password: str) -> None:
        """Change an existing user's password; returns once the new one is accepted.

        The old password is rejected from then on.  Raises ``KeyError`` for unknown users.
        """
        if not self._user_file(user).exists():
            raise KeyError(user)
        self._write_user(user, password)

    def remove_user(self, user: str) -> None:
        """Delete a user (their mail stays); returns once Dovecot rejects the login."""
        with self._lock:
            self._user_file(user).unlink(missing_ok=True)
            if self._is_running():
                self._wait_visible(user, None)

    def new_user(self, prefix: str = "u") -> DovecotUser:
        """Create a user with a unique address ``<prefix><random>@example.test``."""
        user = DovecotUser(
            email=f"{prefix}{secrets.token_hex(5)}@example.test",
            password=secrets.token_urlsafe(12),
        )
        self.add_user(user.email, user.password)
        return user

    # -- IMAP helpers ----------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies this server's certificate (via ``ca_file``)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def append(
        self, user: str, password: str, message: bytes, mailbox: str = "INBOX"
    ) -> int | None:
        """Deliver *message* with a real IMAP ``APPEND`` over the plaintext port.

        Blocking (use :meth:`aappend` from trio).  Returns the new UID (from
        ``APPENDUID``) or None.  Raises ``imaplib.IMAP4.error`` on failure.
        """
        with imaplib.IMAP4(self.host, self.plain_port, timeout=_TIMEOUT) as imap:
            imap.login(user, password)
            typ, data = imap.append(mailbox, None, None, message)
            if typ != "OK":
                raise imaplib.IMAP4.error(f"APPEND failed: {typ} {data!r}")
            imap.logout()
        match = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
        return int(match.group(1)) if match else None

    async def aappend(
        self, user: str, password: str, message: bytes, mailbox: str = "INBOX"
    ) -> int | None:
        """:meth:`append` run in a worker thread (``trio.to_thread.run_sync``)."""
        return await trio.to_thread.run_sync(
            functools.partial(self.append, user, password, message, mailbox)
        )

    def connections(self, user: str) -> int:
        """Number of logged-in IMAP sessions of *user* (``doveadm who -1``, i.e. anvil).

        Only sessions past LOGIN/AUTHENTICATE count; a connection that is still in
        the pre-login state (greeting, STARTTLS) does not.
        """
        out = self.doveadm("who", "-1", user)
        count = 0
        for line in out.splitlines()[1:]:  # first line is the header
            fields = line.split()
            if fields and fields[0] == user:
                count += 1
        return count

    async def wait_for_connections(self, user: str, expected: int, *, within: float = 10) -> None:
        """Poll :meth:`connections` until it equals *expected*.

        Raises ``trio.TooSlowError`` if that does not happen *within* seconds.
        """
        with trio.fail_after(within):
            # Dovecot's state can only be polled (no event to wait on).
            while await trio.to_thread.run_sync(self.connections, user) != expected:  # noqa: ASYNC110
                await trio.sleep(0.05)

    def kick(self, user: str) -> None:
        """``doveadm kick``: disconnect all of *user*'s logged-in sessions (server side)."""
        self.doveadm("kick", user)

    def doveadm(self, *args: str) -> str:
        """Run ``doveadm -c <our config> ARGS...`` and return stdout; raise on failure."""
        proc = subprocess.run(
            [str(self.doveadm_bin), "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"doveadm {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    # -- internals -------------------------------------------------------------------

    def _user_file(self, user: str) -> Path:
        if not _USER_RE.match(user):
            raise ValueError(f"unsupported user name for the test Dovecot: {user!r}")
        return self.users_dir / user

    def _write_user(self, user: str, password: str) -> None:
        if _BAD_PASSWORD_CHARS & set(password) or not password:
            raise ValueError("password must be non-empty without ':', tabs or newlines")
        with self._lock:
            path = self._user_file(user)
            home = self.mail_dir / user
            tmp = path.with_name(f".{user}.tmp")
            tmp.write_text(
                f"{user}:{{PLAIN}}{password}:{self.mail_uid}:{self.mail_gid}::{home}::\n"
            )
            tmp.chmod(0o644)
            # passwd-file change detection is mtime (whole seconds) + size: give every
            # write its own second so an equal-length password change is still seen.
            self._users_mtime = max(int(time.time()), self._users_mtime + 1)
            os.utime(tmp, (self._users_mtime, self._users_mtime))
            tmp.replace(path)
            if self._is_running():
                self._wait_visible(user, password)

    def _wait_visible(self, user: str, password: str | None) -> None:
        """Block until Dovecot's auth sees *user* with *password* (None: user gone).

        A brand-new user file is read on first lookup, so that usually succeeds at once.
        A changed file may be hidden by the once-per-second stat gate: then retry just
        after the next wall-clock second starts, when the gate is guaranteed to open.
        """
        if password is None:
            # A lookup, not a login: no failure delay while the user still exists.
            # Exit codes: 0 found, 67 (EX_NOUSER) unknown.
            args: tuple[str, ...] = ("auth", "lookup", "--", user)
            want, retry = _EX_NOUSER, {0}
        else:
            # no-penalty: belt and braces, the auth penalty is already off (see the
            # config).  "--": passwords may start with "-".  Exit codes: 0 ok,
            # 77 (EX_NOPERM) bad password, 67 (EX_NOUSER) unknown user.
            args = ("auth", "test", "-x", "service=imap", "-x", "no-penalty=1", "--")
            args += (user, password)
            want, retry = 0, {_EX_NOPERM, _EX_NOUSER}
        deadline = time.monotonic() + _TIMEOUT
        while True:
            proc = subprocess.run(
                [str(self.doveadm_bin), "-c", str(self.config_path), *args],
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                check=False,
            )
            if proc.returncode == want:
                return
            if proc.returncode not in retry or time.monotonic() > deadline:
                raise ServerStartError(
                    f"Dovecot did not pick up the passwd-file change for {user!r} "
                    f"(doveadm {args[:2]} exit {proc.returncode}): {proc.stdout}{proc.stderr}"
                )
            time.sleep(1.02 - time.time() % 1)

    def _write_config(self) -> None:
        b = self.base_dir
        root = os.geteuid() == 0
        # Not root: Dovecot cannot chroot, so switch off the services' default chroots.
        no_chroot = "" if root else "  chroot =\n"
        # ...nor chown sockets to the "dovecot" group.
        internal_group = "" if root else f"default_internal_group = {_group_name()}\n"
        unchrooted = (
            ""
            if root
            else "".join(
                f"service {name} {{\n  chroot =\n}}\n"
                for name in ("anvil", "ipc", "old-stats", "imap-urlauth-login")
            )
        )
        oauth2_mechanisms = oauth2_passdb = ""
        if self.oauth2_introspection_url is not None:
            oauth2_conf = b / "oauth2.conf"
            oauth2_conf.write_text(
                f"introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "force_introspection = yes\n"
                "username_attribute = username\n"
                "active_attribute = active\n"
                "active_value = true\n"
            )
            oauth2_conf.chmod(0o644)
            oauth2_mechanisms = " xoauth2 oauthbearer"
            oauth2_passdb = (
                "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                f"  args = {oauth2_conf}\n}}\n"
            )
        self.config_path.write_text(
            f"""# generated by tests/servers/dovecot.py -- throwaway test server
base_dir = {b}/run
state_dir = {b}/state
instance_name = {self.instance_name}
log_path = {self.log_path}
protocols = imap
listen = {self.host}
verbose_proctitle = yes
shutdown_clients = yes

default_login_user = {self.login_user}
default_internal_user = {self.internal_user}
{internal_group}first_valid_uid = {min(100, self.mail_uid)}
default_client_limit = 2000
default_process_limit = 1000

ssl = yes
ssl_cert = <{self.cert_file}
ssl_key = <{self.key_file}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no

auth_mechanisms = plain login{oauth2_mechanisms}
auth_cache_size = 0
auth_failure_delay = 0
auth_verbose = yes
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.users_dir}/%u
}}

mail_location = maildir:~/Maildir
mailbox_idle_check_interval = 1 secs
# a Spamverdacht folder (made by a test, not auto-created; no provider uses the name)
# is marked \\Junk in LIST
namespace inbox {{
  inbox = yes
  mailbox Spamverdacht {{
    special_use = \\Junk
  }}
}}

service imap-login {{
  inet_listener imap {{
    address = {self.host}
    port = {self.plain_port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.tls_port}
    ssl = yes
  }}
  service_count = 0
  client_limit = 1000
  process_min_avail = 1
{no_chroot}}}
service imap {{
  process_limit = 1000
}}
service anvil {{
  client_limit = 5000
  # No socket -> auth cannot reach anvil -> the auth penalty (2..15 s extra delay per
  # remote IP after failed logins) is disabled.  Tests fail logins on purpose.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{unchrooted}{self.extra_config}"""
        )
        self.config_path.chmod(0o644)

    def _spawn(self) -> None:
        _raise_fd_limit()
        with self.stderr_path.open("ab") as err:
            self._proc = subprocess.Popen(
                [str(self.dovecot_bin), "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.base_dir,
                start_new_session=True,  # own process group: stop() waits for all of it
            )
        deadline = time.monotonic() + _TIMEOUT
        pending = [self.plain_port, self.tls_port]
        while pending:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise ServerStartError(
                    f"dovecot exited with {code} during start-up\n"
                    f"--- {self.stderr_path} ---\n{tail(self.stderr_path)}\n"
                    f"--- {self.log_path} ---\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"dovecot did not greet on {pending} within {_TIMEOUT}s\n{tail(self.log_path)}"
                )
            if self._greets(pending[0], tls=pending[0] == self.tls_port):
                pending.pop(0)
            else:
                time.sleep(0.02)

    def _greets(self, port: int, *, tls: bool) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=5) as raw:
                if tls:
                    with self.ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
                        return s.recv(100).startswith(b"* OK")
                return raw.recv(100).startswith(b"* OK")
        except (OSError, ssl.SSLError):
            return False

    def _is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _atexit(self) -> None:
        """Interpreter exit without :meth:`cleanup` (e.g. Ctrl-C): leave nothing behind."""
        with contextlib.suppress(Exception):
            self.cleanup()

    def __repr__(self) -> str:
        return (
            f"<DovecotServer {self.host} plain={self.plain_port} tls={self.tls_port} "
            f"in {self.base_dir}>"
        )


def _raise_fd_limit(want: int = 8192) -> None:
    """Raise our soft ``RLIMIT_NOFILE`` (inherited by Dovecot) towards *want*.

    With the default 1024 Dovecot warns that its client limits cannot be reached, and
    tests that open many sessions would hit EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _group_name() -> str:
    try:
        return grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        return str(os.getegid())


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _process_group_alive(pgid: int) -> bool:
    """True while a non-zombie process is in process group *pgid*.

    Zombies are ignored: orphaned Dovecot children are reparented to PID 1, which in
    some containers reaps late; they hold no sockets any more.
    """
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: fall back to "any member, zombie or not"
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces/parens.
        fields = stat_line[stat_line.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False
