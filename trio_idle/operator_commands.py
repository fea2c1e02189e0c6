"""Operator commands behind ``trio-idle check``, ``encrypt``, ``decrypt --check`` and
``serve --once``.

Guarantee for all of them: no secret is ever printed — not the IMAP passwords (decrypted
only in memory, scrubbed from server answers by the IMAP client), not the tokens' key,
not the database URL. Results go to ``out`` (stdout), log lines to loguru (stderr).

Exit codes: 0 everything is fine, 1 something failed (the output says what); the CLI
turns configuration errors into 2 before any of this runs.
"""

from __future__ import annotations

import getpass
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TextIO

import attrs
import trio
from loguru import logger

from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection, RowProblem, build_connection
from trio_idle.accounts.credentials import AccessToken, TokenSource, TokenUnavailable
from trio_idle.accounts.outcome_text import ConnectionSecrets, weak_password_ids
from trio_idle.accounts.providers import connection_preset
from trio_idle.auth.token_backend import make_token_source
from trio_idle.core.config import Settings
from trio_idle.core.crypto import DecryptionError, decrypt_password, derive_key, encrypt_password
from trio_idle.core.errors import ImapError, SourceError
from trio_idle.core.scrub import PLAIN, WEAK_BELOW
from trio_idle.imap.asyncio_loop import open_asyncio_loop
from trio_idle.imap.client import ImapConnection, ImapTimeouts
from trio_idle.imap.connect import connect, make_ssl_context, resolve_security
from trio_idle.imap.framing import ImapLimits
from trio_idle.mailbox.account_health import explain
from trio_idle.mailbox.session_states import SESSION_STATES, UP_STATES

if TYPE_CHECKING:
    from trio_idle.runtime.daemon import Daemon
    from trio_idle.runtime.refresher import ConnectionSource

DEFAULT_CHECK_CONCURRENCY: Final = 10
#: the widest a cell of the ``check`` table gets (server text is cut shorter already)
TABLE_CELL_CHARS: Final = 240

# ------------------------------------------------------------------------------ check


@attrs.define
class CheckRow:
    """One line of the ``check`` table."""

    conn_id: str
    email: str
    where: str
    ok: bool
    result: str


def _cell(row: Mapping[str, Any], column: str, default: str = "-") -> str:
    value = row.get(column)
    return default if value is None or str(value).strip() == "" else str(value).strip()


def check_rows(
    rows: Iterable[Mapping[str, Any]], key: bytes
) -> tuple[list[CheckRow], dict[str, MailConnection]]:
    """Validate and decrypt every row (pure). Returns the table rows, in source order,
    and the usable connections by id (a duplicate id keeps the first row)."""
    table: list[CheckRow] = []
    good: dict[str, MailConnection] = {}
    for row in rows:
        where = f"{_cell(row, 'imapHost')}:{_cell(row, 'imapPort')}"
        result = build_connection(row, key)
        if isinstance(result, RowProblem):
            table.append(
                CheckRow(result.connection_id, _cell(row, "email"), where, False, result.message)
            )
        elif result.id in good:
            message = "duplicate id; the daemon keeps the first row"
            table.append(CheckRow(result.id, result.email, where, False, message))
        else:
            good[result.id] = result
            where = f"{result.host}:{result.port}"
            table.append(CheckRow(result.id, result.email, where, True, "ok (decrypted)"))
    return table, good


async def try_login(
    conn: MailConnection,
    settings: Settings,
    context: ssl.SSLContext | None,
    tokens: TokenSource | None = None,
) -> str | None:
    """Connect, LOGIN (``oauth2`` rows: AUTHENTICATE with a token from ``tokens``),
    LOGOUT. ``None`` on success, else a log-safe error (no password, no token).

    Needs a trio-asyncio loop. Bounded by connect + 2 command timeouts (+ LOGOUT's),
    after the token request (bounded by ``token_timeout``).
    """
    secret: str | None = None
    token: AccessToken | None = None
    if conn.auth == AUTH_OAUTH2:
        if tokens is None:
            return "no token source for oauth2 connections"
        try:
            with trio.fail_after(settings.webhook.token_timeout + 5):
                token = await tokens.get(conn)
        except TokenUnavailable as exc:
            return f"no access token ({exc.reason}): {ConnectionSecrets.of(conn).scrub(exc)}"
        except trio.TooSlowError:
            return "no access token in time"
        secret = token.token.reveal()
    security = resolve_security(conn.security or settings.imap.imap_security, conn.port)
    timeouts = ImapTimeouts(
        connect=settings.timers.connect_timeout,
        command=settings.timers.command_timeout,
        keepalive_idle=settings.imap.tcp_keepalive,
    )
    imap: ImapConnection | None = None
    try:
        with trio.fail_after(
            settings.timers.connect_timeout + 2 * settings.timers.command_timeout + 5
        ):
            imap = await connect(
                conn,
                security=security,
                context=None if security == "plain" else context,
                timeouts=timeouts,
                refuse=settings.imap.refuse_networks,
                limits=ImapLimits(
                    max_line=settings.imap.max_line, max_literal=settings.imap.max_literal
                ),
            )
            if token is None or secret is None:
                await imap.login(conn.login, conn.password.reveal())
            else:
                await imap.authenticate_oauth2(token.user or conn.login, secret)
        return None
    except ImapError as exc:
        # the classified health and its one-line fix follow the server's text
        return explain(
            ConnectionSecrets.of(conn, secret).failure(exc),
            connection_preset(conn.provider, conn.email, conn.host),
            oauth=conn.auth == AUTH_OAUTH2,
        )
    except trio.TooSlowError:
        return "no answer in time"
    except Exception as exc:  # report, never crash the whole check
        return f"internal error: {type(exc).__name__}"
    finally:
        if imap is not None:
            with trio.CancelScope(shield=True):
                await imap.logout(settings.timers.logout_timeout)


def format_table(rows: Sequence[CheckRow]) -> str:
    """Aligned columns: ID, EMAIL, HOST:PORT, RESULT."""
    header = ("ID", "EMAIL", "HOST:PORT", "RESULT")
    # every cell may come from a row or a server: one printable line each, bounded
    cells = [header] + [
        tuple(
            PLAIN.scrub(cell, TABLE_CELL_CHARS)
            for cell in (r.conn_id, r.email, r.where, r.result if r.ok else f"FAILED: {r.result}")
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
    return "\n".join(line.rstrip() for line in lines)


async def run_check(
    settings: Settings,
    source: ConnectionSource,
    out: TextIO,
    *,
    login: bool = False,
    concurrency: int = DEFAULT_CHECK_CONCURRENCY,
) -> int:
    """``trio-idle check``: read the source, decrypt every row, optionally log in."""
    async with open_asyncio_loop():
        try:
            rows = await source.fetch()
        except SourceError as exc:
            print(f"connection source ({source.name}): FAILED: {exc}", file=out)
            return 1
        table, good = check_rows(
            rows,
            derive_key(
                settings.connections.encryption_key.reveal(), settings.connections.key_derivation
            ),
        )
        if weak := weak_password_ids(good.values()):
            logger.warning(
                f"[idle/check] {len(weak)} connection(s) have a password shorter than "
                f"{WEAK_BELOW} characters ({', '.join(PLAIN.scrub(i, 80) for i in weak)}): "
                "server text can only mask it where it stands alone as a word"
            )
        logger.info(
            f"[idle/check] {len(rows)} rows from {source.name}, {len(good)} usable"
            + (f"; trying LOGIN on each ({concurrency} at a time)" if login and good else "")
        )
        if login and good:
            context = make_ssl_context(settings.imap.ca_file)
            limiter = trio.CapacityLimiter(concurrency)
            by_id = {r.conn_id: r for r in table if r.ok}
            oauth2 = any(c.auth == AUTH_OAUTH2 for c in good.values())
            tokens = make_token_source(settings) if oauth2 else None

            async def one(conn: MailConnection) -> None:
                async with limiter:
                    error = await try_login(conn, settings, context, tokens)
                row = by_id[conn.id]
                ok = "ok (login)"
                if conn.auth == AUTH_OAUTH2 and tokens is not None:
                    which = tokens.source_for(conn)
                    ok = f"ok (oauth2, token from {getattr(which, 'name', 'the token source')})"
                row.ok, row.result = error is None, error or ok

            try:
                async with trio.open_nursery() as nursery:
                    for conn in good.values():
                        nursery.start_soon(one, conn)
            finally:
                if tokens is not None:
                    with trio.CancelScope(shield=True):
                        await tokens.aclose()
    failed = sum(1 for r in table if not r.ok)
    if table:
        print(format_table(table), file=out)
    print(f"{len(table)} connections: {len(table) - failed} ok, {failed} failed", file=out)
    return 1 if failed else 0


# ------------------------------------------------------------------------------ crypto


def read_secret(stdin: TextIO, prompt: Callable[[str], str] = getpass.getpass) -> str:
    """The secret to encrypt: a no-echo prompt (asked twice) on a TTY, else all of stdin
    with one trailing newline removed. Raises ``ValueError`` (log-safe) when unusable."""
    if stdin.isatty():
        first = prompt("IMAP password (not echoed): ")
        if prompt("Again: ") != first:
            raise ValueError("the two entries differ")
        secret = first
    else:
        secret = stdin.read()
        if secret.endswith("\n"):
            secret = secret[:-1]
            if secret.endswith("\r"):
                secret = secret[:-1]
    if not secret:
        raise ValueError("empty password")
    return secret


def encrypt_command(
    settings: Settings,
    stdin: TextIO,
    out: TextIO,
    err: TextIO,
    *,
    iv_size: int = 16,
    prompt: Callable[[str], str] = getpass.getpass,
) -> int:
    """``trio-idle encrypt``: print the ``iv:tag:ciphertext`` token of the secret on stdin."""
    try:
        secret = read_secret(stdin, prompt)
    except (ValueError, EOFError) as exc:
        print(f"trio-idle: encrypt: {exc or 'no input'}", file=err)
        return 1
    key = derive_key(
        settings.connections.encryption_key.reveal(), settings.connections.key_derivation
    )
    print(encrypt_password(secret, key, iv_size=iv_size), file=out)
    return 0


def decrypt_check_command(settings: Settings, stdin: TextIO, out: TextIO) -> int:
    """``trio-idle decrypt --check``: does each token on stdin decrypt with this key?

    A line is ``TOKEN`` or ``LABEL<whitespace>TOKEN`` (e.g. ``psql -At -F $'\\t'`` output
    of ``id, "encryptedPassword"``); blank lines and ``#`` comments are skipped. Prints
    ``<label or line N>: ok`` or ``...: FAILED: <why>`` — never the plaintext.
    """
    key = derive_key(
        settings.connections.encryption_key.reveal(), settings.connections.key_derivation
    )
    ok = failed = 0
    for number, line in enumerate(stdin, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        label, token = (parts[0], parts[-1]) if len(parts) > 1 else (f"line {number}", text)
        try:
            decrypt_password(token, key)
        except DecryptionError as exc:
            failed += 1
            print(f"{label}: FAILED: {exc}", file=out)
        else:
            ok += 1
            print(f"{label}: ok", file=out)
    if ok + failed == 0:
        print("no tokens on stdin", file=out)
        return 1
    print(f"{ok + failed} tokens: {ok} ok, {failed} failed", file=out)
    return 1 if failed else 0


# ------------------------------------------------------------------------------ serve --once


def once_deadline(settings: Settings, sessions: int) -> float:
    """How long ``serve --once`` waits for every session's first outcome: the connect
    ramp (``sessions / connect_rate``), one connect plus LOGIN and SELECT, and 5 s."""
    ramp = sessions / settings.limits.connect_rate
    return ramp + settings.timers.connect_timeout + 2 * settings.timers.command_timeout + 5.0


def settled(daemon: Daemon) -> bool:
    """Every session has connected at least once or failed at least once."""
    return all(
        h.memory.sessions > 0 or h.memory.last_error is not None
        for h in daemon.reconciler.handles.values()
    )


def once_report(daemon: Daemon, timed_out: bool) -> tuple[int, str]:
    """The ``serve --once`` report (pure over the daemon's state) and its exit code."""
    status = daemon.status()
    handles = daemon.reconciler.handles
    lines: list[str] = []
    if status.last_refresh_ok is None:
        lines.append(f"connection list: FAILED: {status.last_refresh_error or 'not loaded'}")
        return 1, "\n".join(lines)
    counts = status.sessions
    up = sum(counts[s] for s in UP_STATES)
    lines.append(
        f"{status.connections_in_source} connections in the source, {len(handles)} sessions, "
        f"{up} connected"
    )
    lines.append("  " + ", ".join(f"{state} {counts[state]}" for state in SESSION_STATES))
    for conn_id, h in sorted(handles.items()):
        if h.memory.state in UP_STATES:
            continue
        why = h.memory.last_error or (
            "no outcome within the time limit" if timed_out else "still connecting"
        )
        lines.append(
            f"FAILED {conn_id} {h.conn.email} {h.conn.host}:{h.conn.port} [{h.memory.state}]: {why}"
        )
    for problem in status.row_problems:
        lines.append(f"SKIPPED {problem.connection_id}: {problem.message}")
    failed = len(handles) - up + len(status.row_problems)
    lines.append("result: all connections watched" if not failed else f"result: {failed} failed")
    return (1 if failed else 0), "\n".join(lines)


async def wait_for_first_outcomes(daemon: Daemon) -> bool:
    """Wait for the first refresh, then until :func:`settled` (polled every 0.1 s, the
    sessions expose no event) within :func:`once_deadline`. Returns False on timeout."""
    s = daemon.settings
    with trio.move_on_after(s.process.db_timeout + 10):
        await daemon.wait_refreshed(after=0)
    if daemon.status().last_refresh_ok is None:
        return True
    with trio.move_on_after(once_deadline(s, len(daemon.reconciler.handles))) as scope:
        while not settled(daemon):  # noqa: ASYNC110 - session state has no event to wait on
            await trio.sleep(0.1)
    return not scope.cancelled_caught
