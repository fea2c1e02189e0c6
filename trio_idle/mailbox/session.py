"""One mailbox's IMAP session: connect, LOGIN, SELECT, IDLE — and reconnect forever.

``oauth2`` connections sign in with SASL (XOAUTH2 / OAUTHBEARER) and an access token
from ``SessionEnv.tokens``, fetched before every (re)connect (never while a session
runs: a token endpoint that is down costs a running IDLE session nothing). A refused
token is replaced by a freshly minted one (``force``) and tried once more before it
counts as an authentication failure; no token (``token_error``) is retried with the
normal backoff (or the endpoint's ``Retry-After``), no grant (``token_unavailable``,
``token_revoked``) with the authentication backoff.

This is where new mail is noticed and a scan requested (:func:`_announce`):
- an ``EXISTS`` pushed during IDLE (reason ``exists``);
- the tick (every ``tick_interval``, jittered): leave IDLE, ``NOOP`` and re-enter IDLE, all
  three answered within one command timeout — a missing answer means a dead (half-open)
  connection — and scan if the count grew meanwhile (reason ``tick``; catches servers that
  never push). The daemon's :class:`~trio_idle.mailbox.ticker.Ticker` writes the three for every
  session and checks the answers are in by the deadline; the session's reads take them
  (it runs a tick itself only when the ticker hands it back, or has no ticker);
- a (re)connect whose SELECT shows a moved ``UIDNEXT`` or a new ``UIDVALIDITY`` compared
  with what the previous session saw (reason ``reconnect``).

For the other watched folders (:mod:`trio_idle.mailbox.folders`) the same happens per
folder: a STATUS after connecting (``reconnect``/``startup``), then once per tick
(``tick``) — or, where the server announces NOTIFY (RFC 5465, ``TRIO_IDLE_NOTIFY``), a
``* STATUS`` the server pushes during IDLE (``exists``), with no STATUS per tick.

It also keeps the accepted mark of the mailbox (:attr:`ConnectionMemory.mark`,
:mod:`trio_idle.state.scan_range`): loaded from the state store by the first session of the
process, set to the server's UIDNEXT when a session decides there is nothing to catch up
on, and moved by the scan worker after each 2xx. Scan requests carry it as ``sinceUid``.
While watching, the session serves the scan worker's envelope requests
(:mod:`trio_idle.mailbox.fetch_desk`): DONE, UID SEARCH, UID FETCH, IDLE under one deadline;
for a folder beside the mailbox (its own desk) DONE, EXAMINE, UID SEARCH, UID FETCH, SELECT
back, IDLE — and mail that reached the mailbox during that visit is announced from the
SELECT's answer (its UIDVALIDITY changed: the catch-up).

IDLE is re-issued every ``idle_renew_interval`` (servers drop it at 29 min), the same way. Servers
without the IDLE capability are polled with NOOP at the tick interval.

All IMAP I/O goes through ``SessionEnv.connector`` (:mod:`trio_idle.imap.connector`):
the daemon's opens real connections, tests use a scripted fake under a virtual clock.

Cancellation (connection removed, credentials changed, shutdown) ends the session with a
LOGOUT written at once; a shielded scope waits up to ``logout_timeout`` for the server to
hang up, then the socket is closed (:meth:`~trio_idle.imap.connector.ImapLink.logout`).
"""

from __future__ import annotations

import math
import random
import ssl
import time
from collections.abc import Callable
from typing import NoReturn

import attrs
import trio

from trio_idle.accounts.connections import AUTH_OAUTH2, MailConnection
from trio_idle.accounts.credentials import TOKEN_ERROR, AccessToken, TokenSource, TokenUnavailable
from trio_idle.accounts.outcome_text import ConnectionSecrets, Failure
from trio_idle.accounts.providers import pace_key, preset_named, provider_timers
from trio_idle.core.backoff import Backoff, BackoffPolicy
from trio_idle.core.config import BackoffSettings, ImapSettings, TimerSettings
from trio_idle.core.errors import KIND_SERVER_CLOSED, ImapAuthError, ImapError, MailboxRefused
from trio_idle.core.folders import FOLDER_WATCH_IDLE
from trio_idle.core.limiter import ConnectLimiter, Pacer
from trio_idle.core.logs import Logger, human_duration, log_internal_error, prefix
from trio_idle.core.stats import Stats
from trio_idle.imap.client import ImapTimeouts
from trio_idle.imap.connect import connect, resolve_security
from trio_idle.imap.connector import ImapConnector, ImapLink
from trio_idle.imap.envelope import FolderMail
from trio_idle.imap.folders import resolve_folders
from trio_idle.imap.framing import ImapLimits
from trio_idle.imap.notify import merged, stale
from trio_idle.imap.responses import MailboxState, catch_up_decision
from trio_idle.mailbox.account_health import Connected
from trio_idle.mailbox.coalescer import ScanCoalescer
from trio_idle.mailbox.fetch_desk import FetchDesk, FetchRequest
from trio_idle.mailbox.folders import (
    FolderMemory,
    Folders,
    apply_check,
    folder_decision,
    missed_during_visit,
    split_connections,
)
from trio_idle.mailbox.session_states import AUTH_FAILED, BACKOFF, CONNECTING, IDLE, POLLING
from trio_idle.mailbox.ticker import IdleTimers, Ticker
from trio_idle.state.catch_up import startup_decision
from trio_idle.state.scan_range import ScanMark, ScanRange, advance, on_connect, scan_range
from trio_idle.state.store import StateStore


@attrs.define
class ConnectionMemory:
    """What outlives one IMAP session of a connection (and a credentials restart)."""

    #: mailbox as last seen; ``uidnext`` is a lower bound advanced on every announced mail
    mailbox: MailboxState | None = None
    state: str = CONNECTING
    last_error: str | None = None
    connected_since: float | None = None
    sessions: int = 0
    #: UNIX time new mail was last noticed (pushed, tick, catch-up) and of the last scan
    #: the backend accepted, in this process (``/status``)
    last_push: float | None = None
    last_scan: float | None = None
    #: told each outcome that says something about the account's health: a
    #: :class:`~trio_idle.mailbox.account_health.Connected`, or the
    #: :class:`~trio_idle.accounts.outcome_text.Failure` that ended an attempt — already text,
    #: scrubbed with the session's secrets, never the raw exception
    #: (:class:`~trio_idle.mailbox.health_reporter.AccountHealth.observe`). Must never block.
    on_outcome: Callable[[Connected | Failure], None] = attrs.field(
        default=lambda outcome: None, repr=False, eq=False
    )
    #: every UID below ``mark.uidnext`` (in its UIDVALIDITY) was accepted by the backend;
    #: None: unknown (new mailbox: the next scan has no ``sinceUid``)
    mark: ScanMark | None = None
    #: where the scan worker asks this connection's session for envelopes
    desk: FetchDesk = attrs.field(factory=FetchDesk, repr=False, eq=False)
    #: the folders watched beside the selected mailbox (:mod:`trio_idle.mailbox.folders`)
    folders: Folders = attrs.field(factory=Folders, repr=False, eq=False)

    def scan_range(self, covered: MailboxState | None) -> ScanRange:
        """The range fields of a scan that starts now and covers ``covered``."""
        return scan_range(self.mark, covered)

    def accepted(self, covered: MailboxState) -> None:
        """The backend answered 2xx for a scan that covered ``covered``."""
        self.mark = advance(self.mark, covered)
        self.last_scan = time.time()


def network_connector(
    imap: ImapSettings, timers: TimerSettings, ssl_context: ssl.SSLContext | None
) -> ImapConnector:
    """The daemon's connector: :func:`trio_idle.imap.connect.connect` with the configured
    security (``auto`` resolved per port), TLS context, timeouts, read limits and refused
    networks."""
    timeouts = ImapTimeouts(
        connect=timers.connect_timeout,
        command=timers.command_timeout,
        keepalive_idle=imap.tcp_keepalive,
    )
    limits = ImapLimits(max_line=imap.max_line, max_literal=imap.max_literal)

    async def open_link(conn: MailConnection) -> ImapLink:
        security = resolve_security(conn.security or imap.imap_security, conn.port)
        return await connect(
            conn,
            security=security,
            context=None if security == "plain" else ssl_context,
            timeouts=timeouts,
            refuse=imap.refuse_networks,
            limits=limits,
        )

    return open_link


@attrs.frozen
class SessionEnv:
    """What all sessions share: the settings groups they read, the connect limiter, TLS
    context, counters, and the connector that opens their IMAP connections.

    A session sees only its settings (``imap``, ``timers``, ``backoff``, ``start_from``),
    never the whole :class:`~trio_idle.core.config.Settings`: what else it could read
    (the webhook's secret, the database URL) is none of its business."""

    limiter: ConnectLimiter
    ssl_context: ssl.SSLContext | None
    stats: Stats
    imap: ImapSettings = attrs.field(kw_only=True)
    timers: TimerSettings = attrs.field(kw_only=True)
    backoff: BackoffSettings = attrs.field(kw_only=True)
    #: where a mailbox new to the state store starts (``TRIO_IDLE_START_FROM``)
    start_from: str = attrs.field(kw_only=True)
    rng: random.Random = attrs.field(factory=random.Random)
    #: persisted "scanned up to" state (restart catch-up); None: no persistence
    store: StateStore | None = None
    #: global pace of catch-up scans (startup/reconnect); None: unpaced
    catchup_pacer: Pacer | None = None
    #: opens one mailbox's IMAP connection; default: :func:`network_connector`
    connector: ImapConnector = attrs.field(
        default=attrs.Factory(
            lambda env: network_connector(env.imap, env.timers, env.ssl_context),
            takes_self=True,
        )
    )
    #: access tokens of ``oauth2`` connections
    #: (:func:`trio_idle.auth.token_backend.make_token_source`);
    #: None: such connections cannot sign in (their sessions say so and back off)
    tokens: TokenSource | None = None
    #: writes every session's tick and renewal from one task (:mod:`trio_idle.mailbox.ticker`);
    #: None: each session waits for its own (tests under a virtual clock)
    ticker: Ticker | None = None
    #: simultaneous IMAP connections one account may hold (the provider preset's
    #: ``max_connections``; None: not published): caps the folders' own connections
    max_connections: Callable[[MailConnection], int | None] = attrs.field(
        default=lambda conn: preset_named(conn.provider).max_connections, repr=False
    )

    #: the reconnect schedule and the authentication failures' schedule, made once from
    #: ``backoff`` for every session (each session keeps only its attempt counters)
    reconnect_policy: BackoffPolicy = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda env: BackoffPolicy(
                env.backoff.backoff_initial,
                env.backoff.backoff_max,
                env.backoff.backoff_reset_after,
            ),
            takes_self=True,
        ),
    )
    auth_policy: BackoffPolicy = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda env: BackoffPolicy(
                env.backoff.auth_backoff, env.backoff.auth_backoff_max, float("inf")
            ),
            takes_self=True,
        ),
    )


async def run_folder_session(
    conn: MailConnection, env: SessionEnv, folder: FolderMemory, log: Logger
) -> None:
    """Keep an IDLE connection of ``folder``'s own alive until cancelled
    (``TRIO_IDLE_FOLDER_WATCH=idle``): :func:`run_session` on the server folder
    ``folder.name``, feeding its coalescer and memory (scans name the folder), with the
    same reconnect, backoff, catch-up and LOGOUT on cancellation.

    The folder is opened with EXAMINE, not SELECT: the session only reads (the backend
    moves or deletes mail through its own connection), EXAMINE cannot change the folder,
    and it leaves ``\\Recent`` to the user's own client (SELECT would take it). IDLE,
    UID SEARCH and UID FETCH work the same on an examined folder.

    The name is the server's, resolved by the mailbox's session (one LIST per
    connection, :meth:`_Watch.open_folders`) and handed over. The trade-off against each
    folder session LISTing for itself: one LIST per mailbox instead of one per folder,
    and one place that decides missing folders (reported once), duplicates (``\\Junk``
    and ``Spam`` naming one folder get one session) and the connection cap; the cost is
    that a folder session starts only after the mailbox's first connect, and a folder
    renamed on the server is followed at the mailbox's next reconnect (until then the
    folder session's EXAMINE is refused).

    Returns (after LOGOUT) only when the server refuses to EXAMINE the folder (``NO``:
    it no longer exists): the caller reports it once and leaves it alone until the next
    hand-over."""
    folder.own_connection = True
    try:
        await run_session(conn, env, folder.coalescer, folder, log, folder=folder.name)
    finally:
        folder.own_connection = False


async def run_session(
    conn: MailConnection,
    env: SessionEnv,
    coalescer: ScanCoalescer,
    memory: ConnectionMemory | FolderMemory,
    log: Logger,
    *,
    folder: str | None = None,
) -> None:
    """Keep one IMAP session alive until cancelled. Never returns otherwise.

    ``folder``: watch this server folder (EXAMINE) instead of ``TRIO_IDLE_MAILBOX``, and
    no other folders (:func:`run_folder_session`); its lines say ``folder <name>:``. Such
    a session also returns when its EXAMINE is refused."""
    where = prefix(conn.email)
    mailbox = env.imap.mailbox
    if folder is not None:
        where, mailbox = f"{where} folder {folder}:", folder
    # Error texts quote the server (and aioimaplib quotes our LOGIN line back, a server
    # may quote the token it refused): every outcome becomes text in one place, with
    # every secret of this connection, before it is logged, stored or told to the health.
    # Made when first needed (a token used, an attempt failed): the set depends on
    # ``conn`` and the tokens used only, and a session that connects at once never needs it.
    secrets: ConnectionSecrets | None = None
    # made when first needed: a session that connects at once never needs either (its
    # frame lives as long as the connection)
    backoff: Backoff | None = None
    auth_backoff: Backoff | None = None
    # the outcome of the last failed attempt, dropped once a session is up
    failure: Failure | None = None
    # OAuth2: a refused token is replaced at once by a fresh one (force) and tried once
    # more before it counts as an auth failure; until a sign-in succeeds, every later
    # attempt asks for a fresh token too (the cached one was refused).
    force_token = False
    quick_retry_used = False
    while True:
        memory.state = CONNECTING
        imap: ImapLink | None = None
        up_since: float | None = None
        token: AccessToken | None = None
        # signed in (or tried to) with an access token
        by_token = False
        try:
            if conn.auth == AUTH_OAUTH2:
                # before the connect slot: a slow token endpoint must not hold IMAP slots
                token = await _get_token(env, conn, force=force_token)
                by_token = True
                secrets = _secrets_of(conn, secrets)
                secrets.use_token(token.token.reveal())
            # paced and shared per provider (else host:port), see core/host_pacing.py
            async with env.limiter.slot(pace_key(conn.provider, conn.host, conn.port)):
                env.stats.inc("connect_attempts")
                imap = await env.connector(conn)
                if token is None:
                    await imap.login(conn.login, conn.password.reveal())
                else:
                    await imap.authenticate_oauth2(token.user or conn.login, token.token.reveal())
                    force_token = quick_retry_used = False
            token = None  # the token source keeps it; not this frame, for the session
            if folder is None:
                selected = await imap.select(mailbox)
            else:
                try:
                    selected = await imap.select(mailbox, readonly=True)
                except MailboxRefused:
                    return  # the folder is gone: run_folder_session's caller reports it
            up_since = trio.current_time()
            auth_backoff = failure = None  # a fresh one counts from 0 again
            memory.sessions += 1
            memory.connected_since = up_since
            memory.last_error = None
            env.stats.inc("connects")
            log.info(f"{where} connected ({conn.host}:{conn.port})")
            _catch_up(conn, env, coalescer, memory, log, where, mailbox, selected)
            del selected  # memory.mailbox holds it while current; this frame is long-lived
            await _watch(_Watch(imap, conn, env, coalescer, memory, log, where=where))
        except TokenUnavailable as exc:
            secrets = _secrets_of(conn, secrets)
            failure = secrets.failure(exc)
            memory.last_error = text = failure.text
            memory.on_outcome(failure)  # revoked / unavailable: auth_failed; token_error: no change
            env.stats.inc("token_failures", exc.reason)
            if exc.reason == TOKEN_ERROR:
                memory.state = BACKOFF
                backoff = backoff or Backoff(env.reconnect_policy, env.rng)
                delay = max(backoff.next_delay(), exc.retry_after or 0.0)
                log.bind(error_kind=f"token_{exc.reason}").warning(
                    f"{where} no access token ({exc.reason}): {text}; "
                    f"next attempt in {human_duration(delay)}"
                )
            else:
                memory.state = AUTH_FAILED
                auth_backoff = auth_backoff or Backoff(env.auth_policy, env.rng)
                delay = auth_backoff.next_delay()
                log.bind(error_kind=f"token_{exc.reason}").error(
                    f"{where} no access token ({exc.reason}): {text} — the account must be "
                    f"reconnected in the app; next attempt in {human_duration(delay)}"
                )
        except ImapAuthError as exc:
            secrets = _secrets_of(conn, secrets)
            failure = secrets.failure(exc)
            memory.last_error = text = failure.text
            if by_token:
                force_token = True
                if not quick_retry_used:
                    quick_retry_used = True
                    env.stats.inc("token_failures", "refused")
                    log.info(f"{where} access token refused: {text}; retrying with a fresh one")
                    continue  # the finally below logs out first
            memory.state = AUTH_FAILED
            memory.on_outcome(failure)
            env.stats.inc("auth_failures")
            auth_backoff = auth_backoff or Backoff(env.auth_policy, env.rng)
            delay = auth_backoff.next_delay()
            what = "the access token was refused" if by_token else "check the stored password"
            log.bind(error_kind=exc.kind or "auth").error(
                f"{where} authentication failed: {text} — {what}; "
                f"next login attempt in {human_duration(delay)}"
            )
        except ImapError as exc:
            memory.state = BACKOFF
            secrets = _secrets_of(conn, secrets)
            failure = secrets.failure(exc)
            memory.last_error = text = failure.text
            memory.on_outcome(failure)
            backoff = backoff or Backoff(env.reconnect_policy, env.rng)
            if up_since is not None:
                env.stats.inc("disconnects")
                backoff.session_ended(trio.current_time() - up_since)
                log.bind(error_kind=exc.kind or KIND_SERVER_CLOSED).warning(
                    f"{where} connection lost: {text}"
                )
            else:
                env.stats.inc("connect_failures")
                log.bind(error_kind=exc.kind or KIND_SERVER_CLOSED).warning(
                    f"{where} connect failed: {text}"
                )
            delay = backoff.next_delay()
        except Exception as exc:  # a bug must cost one mailbox a reconnect, not the process
            memory.state = BACKOFF
            memory.last_error = f"internal error: {type(exc).__name__}"
            env.stats.inc("internal_errors")
            log_internal_error(log, where, exc, _secrets_of(conn, secrets))
            backoff = backoff or Backoff(env.reconnect_policy, env.rng)
            delay = backoff.next_delay()
        finally:
            memory.connected_since = None
            if imap is not None:
                with trio.CancelScope(shield=True):
                    await imap.logout(env.timers.logout_timeout)
        if memory.state == BACKOFF:
            assert backoff is not None  # every way into BACKOFF drew its delay from it
            log.bind(duration=delay).info(
                f"{where} reconnecting in {human_duration(delay)} (attempt {backoff.attempt + 1})"
            )
        await trio.sleep(delay)


def _secrets_of(conn: MailConnection, secrets: ConnectionSecrets | None) -> ConnectionSecrets:
    """``secrets``, or ``conn``'s set if none was made yet (:func:`run_session`)."""
    return secrets if secrets is not None else ConnectionSecrets.of(conn)


def _catch_up(
    conn: MailConnection,
    env: SessionEnv,
    coalescer: ScanCoalescer,
    memory: ConnectionMemory | FolderMemory,
    log: Logger,
    where: str,
    mailbox: str,
    selected: MailboxState,
) -> None:
    """A session selected ``mailbox`` and saw ``selected``: compare with what the last
    session (or the last run, through the state store) saw, keep it, and request the
    catch-up scan if mail may have arrived meanwhile. A function of its own: what the
    decision needs (the stored state, the decision) is not kept by the session's frame."""
    if memory.mailbox is None and env.store is not None and env.store.enabled:
        # first session in this process: compare with what the last run scanned
        stored = env.store.get(conn.id, mailbox)
        decision = startup_decision(stored, selected, env.start_from)
        reason = "startup"
        if stored is not None and memory.mark is None:
            memory.mark = ScanMark(stored.uidvalidity, stored.uidnext)
        elif stored is None and not decision.scan:
            # TRIO_IDLE_START_FROM=now: what the mailbox holds counts as scanned
            # (the previous daemon's backend did it); stored, so that the next
            # start compares with it instead of scanning everything after all
            env.store.record(conn.id, mailbox, selected.uidvalidity, selected.uidnext)
            env.stats.inc("started_from_now")
            log.info(f"{where} {decision.why}: UIDNEXT {selected.uidnext} recorded")
    else:
        decision, reason = catch_up_decision(memory.mailbox, selected), "reconnect"
    memory.mailbox = selected
    memory.mark = on_connect(memory.mark, selected, scanning=decision.scan)
    if decision.scan:
        log.info(f"{where} catch-up scan ({decision.why})")
        env.stats.inc("catch_up_scans", reason)
        coalescer.request(reason)


async def _get_token(env: SessionEnv, conn: MailConnection, *, force: bool) -> AccessToken:
    """The access token to sign in with; :class:`TokenUnavailable` if there is none."""
    if env.tokens is None:
        raise TokenUnavailable(TOKEN_ERROR, "no token source configured for oauth2 connections")
    return await env.tokens.get(conn, force=force)


def first_timers(
    now: float, tick_interval: float, renew_interval: float, rng: random.Random
) -> tuple[float, float]:
    """When a new session first ticks and first renews IDLE: ``(next_tick, renew_at)``.

    Pure. Random phases spread sessions that connected in the same second (a start, a
    server coming back) over half the tick interval and the last fifth of the renew
    interval, so their ticks and renewals never come in one burst. Renewal is only ever
    early: servers drop IDLE at 29 minutes. Later deadlines count from when the previous
    one was handled, so the spread persists.
    """
    return (
        now + tick_interval * rng.uniform(0.5, 1.0),
        now + renew_interval * rng.uniform(0.8, 1.0),
    )


@attrs.frozen
class _Watch:
    """One connected session as its watch loops use it: the link, and what announcing
    new mail needs. Made once per connection, after SELECT."""

    imap: ImapLink
    conn: MailConnection
    env: SessionEnv
    coalescer: ScanCoalescer
    memory: ConnectionMemory | FolderMemory
    log: Logger
    #: the ``[idle/<email>]`` prefix of its lines (and ``folder <name>:`` for a folder's own)
    where: str = attrs.field(kw_only=True)
    #: the other folders this connection checks with STATUS (server names); a folder
    #: the server stops answering for is dropped from it
    folders: list[str] = attrs.field(factory=list)

    async def open_folders(self) -> None:
        """Resolve the watched folders (the row's own, else ``TRIO_IDLE_FOLDERS``) beside
        the selected mailbox (one LIST, before IDLE) and check them once (STATUS): a
        folder whose UIDNEXT moved since the last session (or the last run: the state
        store) gets a scan. A folder the server lacks is reported once per connection
        row, then left alone.

        In ``idle`` mode (``TRIO_IDLE_FOLDER_WATCH``, the row's ``imapFolderWatch``) the
        resolved folders are handed over to sessions of their own instead (within the
        provider's connection limit; the rest stay here, with one warning per row). A
        folder session's memory watches no other folders."""
        memory = self.memory
        if not isinstance(memory, ConnectionMemory):
            return
        env, selected = self.env, self.env.imap.mailbox
        wanted = self.conn.folders if self.conn.folders is not None else env.imap.folders
        extras = [f for f in wanted if not _same_folder(f, selected)]
        if not extras:
            return
        resolved = resolve_folders(extras, await self.imap.list_folders())
        memory.folders.resolved = dict(resolved.found)
        for name in resolved.missing:
            if memory.folders.missing(name):
                self._report_missing(name, "not found on the server")
        found = tuple(f for f in resolved.folders if not _same_folder(f, selected))
        mode = self.conn.folder_watch or env.imap.folder_watch
        limit = env.max_connections(self.conn)
        split = split_connections(found, idle=mode == FOLDER_WATCH_IDLE, max_connections=limit)
        if split.capped and not memory.folders.capped_reported:
            memory.folders.capped_reported = True
            env.stats.inc("folder_connections_capped")
            self.log.bind(error_kind="folder_connections_capped").warning(
                f"{self.where} the provider allows {limit} IMAP connections per account: "
                f"{len(split.own)} folder(s) get their own, {', '.join(split.polled)} "
                "checked with STATUS every tick instead"
            )
        memory.folders.hand_over(split.own)
        self.folders[:] = split.polled
        if self.folders and env.imap.imap_notify == "auto" and self.imap.has_idle:
            # before the STATUS check: mail that arrives between the two is pushed, not
            # missed until the next connect (no STATUS per tick under NOTIFY)
            await self.start_notify()
        await self.check_folders("reconnect")

    @property
    def notifying(self) -> bool:
        """Whether NOTIFY pushes the other folders' new mail on this connection (then
        they are not checked with STATUS every tick)."""
        return self.imap.monitor.notify is not None

    async def start_notify(self) -> None:
        """``NOTIFY SET`` for the other folders where the server announces NOTIFY; a
        refusal (NO/BAD) leaves them to STATUS every tick, logged and counted."""
        answer = await self.imap.notify_set(tuple(self.folders))
        if answer.in_effect:
            self.log.info(
                f"{prefix(self.conn.email)} folders {', '.join(self.folders)}: watched with NOTIFY"
            )
        elif answer.refused:
            self._notify_fallback("refused", answer.why)

    def _notify_fallback(self, cause: str, text: str) -> None:
        """NOTIFY is not (or no longer) in effect on this connection: said once."""
        self.env.stats.inc("notify_fallbacks", cause)
        text = ConnectionSecrets.of(self.conn).scrub(text)
        self.log.bind(error_kind=f"notify_{cause}").warning(
            f"{prefix(self.conn.email)} NOTIFY {text}: "
            "checking the folders with STATUS every tick on this connection"
        )

    def take_notify(self) -> bool:
        """Act on what NOTIFY pushed: each watched folder's pushed STATUS is decided as a
        check (reason ``exists``: a moved UIDNEXT requests that folder's scan); STATUS
        for folders not watched, or unreadable, are counted. True when the server gave
        up on NOTIFY (``[NOTIFICATIONOVERFLOW]``): the folders must be checked with
        STATUS now, and every tick from then on. Synchronous."""
        monitor = self.imap.monitor
        watch = monitor.notify
        if watch is None:
            return False
        ignored, malformed = watch.take_counts()
        if ignored:
            self.env.stats.inc("notify_status_ignored", "unwatched", ignored)
        if malformed:
            self.env.stats.inc("notify_status_ignored", "malformed", malformed)
        memory = self.memory
        assert isinstance(memory, ConnectionMemory)  # NOTIFY is only set for its folders
        for name, pushed in watch.take().items():
            if name in self.folders:
                known = memory.folders.by_name.get(name)
                last = known.mailbox if known is not None else None
                current = merged(last, pushed)
                if not stale(last, current):
                    self.decide_folder(name, current, "exists")
        if not watch.overflow:
            return False
        monitor.notify = None
        self._notify_fallback("overflow", "overflow (the server sent [NOTIFICATIONOVERFLOW])")
        return True

    def _report_missing(self, name: str, why: str) -> None:
        self.env.stats.inc("folders_missing")
        self.log.bind(error_kind="folder_missing").warning(
            f"{prefix(self.conn.email)} folder {name} {why}: not watched"
        )

    async def check_folders(self, reason: str) -> None:
        """STATUS of every other folder (DONE/IDLE around it if idling, one command
        deadline); a moved UIDNEXT or a new UIDVALIDITY requests a scan of that folder
        (``reason``: ``reconnect`` right after connecting, ``tick`` later; ``startup``
        for its first check in this process when there is a state store)."""
        memory = self.memory
        if not self.folders or not isinstance(memory, ConnectionMemory):
            return
        states = await self.imap.check_folders(tuple(self.folders))
        for name, current in states.items():
            if current is None:
                self.folders.remove(name)
                if (gone := memory.folders.by_name.get(name)) is not None:
                    gone.close_desk()
                if memory.folders.gone(name):
                    self._report_missing(name, "no longer exists (STATUS refused)")
                continue
            self.decide_folder(name, current, reason)

    def decide_folder(self, name: str, current: MailboxState, reason: str) -> None:
        """``name`` is now ``current`` (a STATUS answer, or pushed): remember it, and
        request its scan if its UIDNEXT moved or its UIDVALIDITY changed."""
        env, memory, conn = self.env, self.memory, self.conn
        assert isinstance(memory, ConnectionMemory)  # a folder's own session has no folders
        store = env.store if env.store is not None and env.store.enabled else None
        folder = memory.folders.get(name)
        stored = store.get(conn.id, name) if store is not None and folder.mailbox is None else None
        decision = folder_decision(
            folder,
            current,
            stored,
            store_enabled=store is not None,
            start_from=env.start_from,
            reason=reason,
        )
        apply_check(folder, current, stored, decision)
        if decision.store_now and store is not None:
            store.record(conn.id, name, current.uidvalidity, current.uidnext)
        if decision.catch_up.scan:
            env.stats.inc("folder_scans", decision.reason)
            if reason == "exists":
                self.log.info(
                    f"{prefix(conn.email)} folder {name}: new mail pushed (NOTIFY STATUS, "
                    f"{decision.catch_up.why}): scan"
                )
            else:
                self.log.info(f"{prefix(conn.email)} folder {name}: scan ({decision.catch_up.why})")
            if not folder.coalescer.request(decision.reason):
                env.stats.inc("scans_coalesced")

    def watched(self) -> list[FolderMemory]:
        """The memories of the folders this connection watches now (a folder's own
        session watches no other)."""
        if not isinstance(self.memory, ConnectionMemory):
            return []
        by_name = self.memory.folders.by_name
        return [by_name[name] for name in self.folders if name in by_name]

    def listen_folders(self, scope: trio.CancelScope) -> None:
        """Until :meth:`unlisten_folders`, a folder's envelope request cancels ``scope``."""
        for folder in self.watched():
            folder.desk.listen(scope)

    def unlisten_folders(self) -> None:
        for folder in self.watched():
            folder.desk.unlisten()

    async def serve_folders(self) -> bool:
        """Serve every folder's waiting envelope request (a visit each: DONE, EXAMINE,
        UID SEARCH, UID FETCH, SELECT back, IDLE); whether one was served. A failure
        still answers the request (``None``) before the error ends the session."""
        served = False
        for folder in self.watched():
            request = folder.desk.take()
            if request is None:
                continue
            served = True
            try:
                visit = await self.imap.fetch_folder_new(
                    folder.name, self.env.imap.mailbox, request.since_uid, request.limit
                )
                known, seen = folder.mailbox, visit.examined
                if (
                    known is None
                    or known.uidvalidity is None
                    or seen.uidvalidity in (None, known.uidvalidity)
                ):
                    request.result = visit.mail
                # else: UIDs in another numbering than the scan's range: the range only
                # (the next STATUS check sees the new UIDVALIDITY)
            finally:
                request.done.set()
            self.back_in_mailbox(visit)
        return served

    def back_in_mailbox(self, visit: FolderMail) -> None:
        """After a visit to another folder: announce what the monitor counted before it,
        then what the SELECT back shows arrived meanwhile (the monitor did not count the
        mailbox's EXISTS then), or run the catch-up if its UIDVALIDITY changed."""
        self.announce("exists")
        memory = self.memory
        missed = missed_during_visit(memory.mailbox, visit.exists_before, visit.selected)
        if missed is None:
            decision = catch_up_decision(memory.mailbox, visit.selected)
            memory.mailbox = visit.selected
            memory.mark = on_connect(memory.mark, visit.selected, scanning=decision.scan)
            self.log.info(f"{prefix(self.conn.email)} catch-up scan ({decision.why})")
            self.env.stats.inc("catch_up_scans", "reconnect")
            if not self.coalescer.request("reconnect"):
                self.env.stats.inc("scans_coalesced")
        elif missed:
            # what the monitor would have counted had the mailbox been selected
            self.imap.monitor.new_mail += missed
            self.announce("exists")

    def announce(self, reason: str) -> None:
        """Request a scan for mail the monitor counted since the last call, if any."""
        monitor = self.imap.monitor
        count = monitor.take_new_mail()
        if not count:
            return
        if monitor.take_tick_mail() and reason == "exists":
            reason = "tick"  # counted while a tick written by the ticker was answered
        stats = self.env.stats
        stats.inc("exists_events", reason)
        memory = self.memory
        memory.last_push = time.time()
        if memory.mailbox is not None and memory.mailbox.uidnext is not None:
            memory.mailbox = attrs.evolve(
                memory.mailbox, uidnext=memory.mailbox.uidnext + count, exists=monitor.exists
            )
        if reason == "exists":
            self.log.info(f"{self.where} exists-event received (new mail)")
        else:
            self.log.info(f"{self.where} {reason}: {count} new message(s) found")
        if not self.coalescer.request(reason):
            stats.inc("scans_coalesced")


def _same_folder(a: str, b: str) -> bool:
    """Whether two folder names are one folder (INBOX is case-insensitive)."""
    return a == b or (a.upper() == "INBOX" and b.upper() == "INBOX")


async def _watch(watch: _Watch) -> None:
    """Watch the selected mailbox (and the other folders) until the connection fails:
    IDLE where the server has it, else :func:`_poll`. Never returns otherwise.

    One frame for the whole of an IDLE session's life (the folders, the desk, the
    timers, the loop), so that an idle session sleeps as ``run_session`` → this →
    :meth:`ImapConnection.wait` → trio: every frame here is kept by every idle
    session. With the process ticker (``env.ticker``) the restarts are written by it
    and answered by the reads of ``wait``; the session wakes for mail, the scan
    worker's fetch request, the folders' check, or a restart the ticker hands back.
    Without it, the wait's deadline is the next restart, which the session runs
    itself."""
    imap, env, memory, log = watch.imap, watch.env, watch.memory, watch.log
    desk = memory.desk
    await watch.open_folders()
    desk.open()
    for folder in watch.watched():
        folder.desk.open()
    try:
        if not imap.has_idle:
            await _poll(watch)
        t = provider_timers(env.timers, watch.conn.provider)  # a provider's shorter timers
        where = watch.where
        next_tick, renew_at = first_timers(
            trio.current_time(), t.tick_interval, t.idle_renew_interval, env.rng
        )
        watch.announce("exists")
        await imap.idle_start()
        memory.state = IDLE
        memory.on_outcome(Connected(idle=True))
        timers = IdleTimers(
            imap,
            env.ticker,
            next_tick=next_tick,
            renew_at=renew_at,
            tick_interval=t.tick_interval,
            renew_interval=t.idle_renew_interval,
            timeout=t.command_timeout,
            log=log,
            renew_line=(
                f"{where} idle renewing ({human_duration(t.idle_renew_interval)} threshold)"
            ),
            stats=env.stats,
        )
        timers.start()
        try:
            # the other folders' STATUS check: the session's own, once per tick interval
            # (its own phase, so it does not wait on the ticker's restart of this
            # connection)
            folders_due = math.inf
            if watch.folders and not watch.notifying:  # under NOTIFY their mail is pushed
                folders_due = trio.current_time() + timers.tick_interval * env.rng.uniform(0.5, 1.0)
            while True:
                # one scope per wake-up (a cancelled scope cannot be entered again): the
                # next tick or renewal (unless the ticker writes them), the next folder
                # check, and the scan worker's fetch request (the desk cancels it). New
                # mail and keepalives do not end it: they are read inside.
                deadline = min(math.inf if timers.passive else timers.due_at, folders_due)
                with trio.CancelScope(deadline=deadline) as wake:
                    desk.listen(wake)
                    watch.listen_folders(wake)
                    timers.wake = wake
                    try:
                        while True:
                            await imap.wait()
                            if (problem := imap.monitor.problem()) is not None:
                                raise imap.monitor.failure or ImapError(problem)
                            watch.announce("exists")
                            if watch.take_notify():  # NOTIFY overflowed: STATUS now, then per tick
                                folders_due = trio.current_time()
                                wake.cancel()
                    finally:
                        desk.unlisten()
                        watch.unlisten_folders()
                        timers.wake = None
                # Mail pushed just as the deadline passed: wait() checkpoints, so the
                # deadline can win over a wake-up that was already due. It was pushed,
                # so it is "exists".
                watch.announce("exists")
                if (request := desk.take()) is not None:
                    await _serve_fetch(imap, request)  # DONE, UID SEARCH, UID FETCH, IDLE
                    watch.announce("exists")
                await watch.serve_folders()  # DONE, EXAMINE, UID SEARCH/FETCH, SELECT, IDLE
                now = trio.current_time()
                if now >= folders_due:
                    await watch.check_folders("tick")  # DONE, STATUS per folder, IDLE
                    watch.announce("exists")
                    now = trio.current_time()
                    folders_due = (
                        now + timers.tick_interval
                        if watch.folders and not watch.notifying
                        else math.inf
                    )
                if now < timers.due_at:
                    continue
                tick = timers.take_due(now)
                # DONE, NOOP (on a tick), IDLE: mail counted meanwhile is announced
                # after, as "tick"
                await imap.restart_idle(noop=tick)
                if tick:
                    timers.next_tick = trio.current_time() + timers.tick_interval
                timers.restarted()
                watch.announce("tick" if tick else "exists")
        finally:
            timers.ended()
    finally:
        desk.close()
        if isinstance(watch.memory, ConnectionMemory):
            for folder in watch.memory.folders.by_name.values():
                if not folder.own_connection:  # its own session serves (and closes) it
                    folder.close_desk()


async def _poll(watch: _Watch) -> NoReturn:
    """A server without IDLE: NOOP every tick interval (and the other folders' STATUS),
    serving the scan worker's fetch requests in between. Never returns."""
    imap, env, memory = watch.imap, watch.env, watch.memory
    t = provider_timers(env.timers, watch.conn.provider)
    desk = memory.desk
    next_tick, _ = first_timers(
        trio.current_time(), t.tick_interval, t.idle_renew_interval, env.rng
    )
    memory.state = POLLING
    memory.on_outcome(Connected(idle=False))
    watch.log.warning(
        f"{watch.where} server has no IDLE capability; polling every "
        f"{human_duration(t.tick_interval)}"
    )
    while True:
        watch.announce("exists")
        with desk.listening(), trio.CancelScope() as folder_asked:
            watch.listen_folders(folder_asked)
            try:
                await trio.sleep_until(next_tick)
            finally:
                watch.unlisten_folders()
        served = await watch.serve_folders()
        if (request := desk.take()) is not None:
            await _serve_fetch(imap, request)
            served = True
        if served and trio.current_time() < next_tick:
            continue
        await imap.noop()
        watch.announce("tick")
        await watch.check_folders("tick")
        next_tick = trio.current_time() + t.tick_interval


async def _serve_fetch(imap: ImapLink, request: FetchRequest) -> None:
    """Run the scan worker's envelope request; a failure still answers it (``None``)
    before the error ends the session."""
    try:
        request.result = await imap.fetch_new(request.since_uid, request.limit)
    finally:
        request.done.set()
