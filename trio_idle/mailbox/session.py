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

It also keeps the accepted mark of the mailbox (:attr:`ConnectionMemory.mark`,
:mod:`trio_idle.state.scan_range`): loaded from the state store by the first session of the
process, set to the server's UIDNEXT when a session decides there is nothing to catch up
on, and moved by the scan worker after each 2xx. Scan requests carry it as ``sinceUid``.
While watching, the session serves the scan worker's envelope requests
(:mod:`trio_idle.mailbox.fetch_desk`): DONE, UID SEARCH, UID FETCH, IDLE under one deadline.

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
from trio_idle.accounts.providers import pace_key, provider_timers
from trio_idle.core.backoff import Backoff, BackoffPolicy
from trio_idle.core.config import BackoffSettings, ImapSettings, TimerSettings
from trio_idle.core.errors import KIND_SERVER_CLOSED, ImapAuthError, ImapError
from trio_idle.core.limiter import ConnectLimiter, Pacer
from trio_idle.core.logs import Logger, human_duration, log_internal_error, prefix
from trio_idle.core.stats import Stats
from trio_idle.imap.client import ImapTimeouts
from trio_idle.imap.connect import connect, resolve_security
from trio_idle.imap.connector import ImapConnector, ImapLink
from trio_idle.imap.folders import resolve_folders
from trio_idle.imap.framing import ImapLimits
from trio_idle.imap.responses import MailboxState, catch_up_decision
from trio_idle.mailbox.account_health import Connected
from trio_idle.mailbox.coalescer import ScanCoalescer
from trio_idle.mailbox.fetch_desk import FetchDesk, FetchRequest
from trio_idle.mailbox.folders import Folders, apply_check, folder_decision
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


async def run_session(
    conn: MailConnection,
    env: SessionEnv,
    coalescer: ScanCoalescer,
    memory: ConnectionMemory,
    log: Logger,
) -> None:
    """Keep one IMAP session alive until cancelled. Never returns otherwise."""
    where = prefix(conn.email)
    # Error texts quote the server (and aioimaplib quotes our LOGIN line back, a server
    # may quote the token it refused): every outcome becomes text in one place, with
    # every secret of this connection, before it is logged, stored or told to the health.
    secrets = ConnectionSecrets.of(conn)
    backoff = Backoff(
        BackoffPolicy(
            env.backoff.backoff_initial, env.backoff.backoff_max, env.backoff.backoff_reset_after
        ),
        env.rng,
    )
    auth_backoff = Backoff(
        BackoffPolicy(env.backoff.auth_backoff, env.backoff.auth_backoff_max, float("inf")), env.rng
    )
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
        try:
            if conn.auth == AUTH_OAUTH2:
                # before the connect slot: a slow token endpoint must not hold IMAP slots
                token = await _get_token(env, conn, force=force_token)
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
            selected = await imap.select(env.imap.mailbox)
            up_since = trio.current_time()
            auth_backoff.attempt = 0
            memory.sessions += 1
            memory.connected_since = up_since
            memory.last_error = None
            env.stats.inc("connects")
            log.info(f"{where} connected ({conn.host}:{conn.port})")
            if memory.mailbox is None and env.store is not None and env.store.enabled:
                # first session in this process: compare with what the last run scanned
                stored = env.store.get(conn.id, env.imap.mailbox)
                decision = startup_decision(stored, selected, env.start_from)
                reason = "startup"
                if stored is not None and memory.mark is None:
                    memory.mark = ScanMark(stored.uidvalidity, stored.uidnext)
                elif stored is None and not decision.scan:
                    # TRIO_IDLE_START_FROM=now: what the mailbox holds counts as scanned
                    # (the previous daemon's backend did it); stored, so that the next
                    # start compares with it instead of scanning everything after all
                    env.store.record(
                        conn.id, env.imap.mailbox, selected.uidvalidity, selected.uidnext
                    )
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
            await _watch(_Watch(imap, conn, env, coalescer, memory, log))
        except TokenUnavailable as exc:
            failure = secrets.failure(exc)
            memory.last_error = text = failure.text
            memory.on_outcome(failure)  # revoked / unavailable: auth_failed; token_error: no change
            env.stats.inc("token_failures", exc.reason)
            if exc.reason == TOKEN_ERROR:
                memory.state = BACKOFF
                delay = max(backoff.next_delay(), exc.retry_after or 0.0)
                log.bind(error_kind=f"token_{exc.reason}").warning(
                    f"{where} no access token ({exc.reason}): {text}; "
                    f"next attempt in {human_duration(delay)}"
                )
            else:
                memory.state = AUTH_FAILED
                delay = auth_backoff.next_delay()
                log.bind(error_kind=f"token_{exc.reason}").error(
                    f"{where} no access token ({exc.reason}): {text} — the account must be "
                    f"reconnected in the app; next attempt in {human_duration(delay)}"
                )
        except ImapAuthError as exc:
            failure = secrets.failure(exc)
            memory.last_error = text = failure.text
            if token is not None:
                force_token = True
                if not quick_retry_used:
                    quick_retry_used = True
                    env.stats.inc("token_failures", "refused")
                    log.info(f"{where} access token refused: {text}; retrying with a fresh one")
                    continue  # the finally below logs out first
            memory.state = AUTH_FAILED
            memory.on_outcome(failure)
            env.stats.inc("auth_failures")
            delay = auth_backoff.next_delay()
            what = (
                "the access token was refused" if token is not None else "check the stored password"
            )
            log.bind(error_kind=exc.kind or "auth").error(
                f"{where} authentication failed: {text} — {what}; "
                f"next login attempt in {human_duration(delay)}"
            )
        except ImapError as exc:
            memory.state = BACKOFF
            failure = secrets.failure(exc)
            memory.last_error = text = failure.text
            memory.on_outcome(failure)
            if up_since is not None:
                env.stats.inc("disconnects")
                backoff.session_ended(trio.current_time() - up_since)
                failed = log.bind(error_kind=exc.kind or KIND_SERVER_CLOSED)
                failed.warning(f"{where} connection lost: {text}")
            else:
                env.stats.inc("connect_failures")
                failed = log.bind(error_kind=exc.kind or KIND_SERVER_CLOSED)
                failed.warning(f"{where} connect failed: {text}")
            delay = backoff.next_delay()
        except Exception as exc:  # a bug must cost one mailbox a reconnect, not the process
            memory.state = BACKOFF
            memory.last_error = f"internal error: {type(exc).__name__}"
            env.stats.inc("internal_errors")
            log_internal_error(log, where, exc, secrets)
            delay = backoff.next_delay()
        finally:
            memory.connected_since = None
            if imap is not None:
                with trio.CancelScope(shield=True):
                    await imap.logout(env.timers.logout_timeout)
        if memory.state == BACKOFF:
            log.bind(duration=delay).info(
                f"{where} reconnecting in {human_duration(delay)} (attempt {backoff.attempt + 1})"
            )
        await trio.sleep(delay)


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
    memory: ConnectionMemory
    log: Logger
    #: the other folders this connection checks with STATUS (server names); a folder
    #: the server stops answering for is dropped from it
    folders: list[str] = attrs.field(factory=list)

    async def open_folders(self) -> None:
        """Resolve the watched folders (the row's own, else ``TRIO_IDLE_FOLDERS``) beside
        the selected mailbox (one LIST, before IDLE) and check them once (STATUS): a
        folder whose UIDNEXT moved since the last session (or the last run: the state
        store) gets a scan. A folder the server lacks is reported once per connection
        row, then left alone."""
        env, selected = self.env, self.env.imap.mailbox
        wanted = self.conn.folders if self.conn.folders is not None else env.imap.folders
        extras = [f for f in wanted if not _same_folder(f, selected)]
        if not extras:
            return
        resolved = resolve_folders(extras, await self.imap.list_folders())
        self.memory.folders.resolved = dict(resolved.found)
        for name in resolved.missing:
            if self.memory.folders.missing(name):
                self._report_missing(name, "not found on the server")
        self.folders[:] = [f for f in resolved.folders if not _same_folder(f, selected)]
        await self.check_folders("reconnect")

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
        if not self.folders:
            return
        env, memory, conn = self.env, self.memory, self.conn
        store = env.store if env.store is not None and env.store.enabled else None
        states = await self.imap.check_folders(tuple(self.folders))
        for name, current in states.items():
            if current is None:
                self.folders.remove(name)
                if memory.folders.gone(name):
                    self._report_missing(name, "no longer exists (STATUS refused)")
                continue
            folder = memory.folders.get(name)
            stored = (
                store.get(conn.id, name) if store is not None and folder.mailbox is None else None
            )
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
                self.log.info(f"{prefix(conn.email)} folder {name}: scan ({decision.catch_up.why})")
                if not folder.coalescer.request(decision.reason):
                    env.stats.inc("scans_coalesced")

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
            self.log.info(f"{prefix(self.conn.email)} exists-event received (new mail)")
        else:
            self.log.info(f"{prefix(self.conn.email)} {reason}: {count} new message(s) found")
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
    try:
        if not imap.has_idle:
            await _poll(watch)
        t = provider_timers(env.timers, watch.conn.provider)  # a provider's shorter timers
        where = prefix(watch.conn.email)
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
            if watch.folders:
                folders_due = trio.current_time() + timers.tick_interval * env.rng.uniform(0.5, 1.0)
            while True:
                # one scope per wake-up (a cancelled scope cannot be entered again): the
                # next tick or renewal (unless the ticker writes them), the next folder
                # check, and the scan worker's fetch request (the desk cancels it). New
                # mail and keepalives do not end it: they are read inside.
                deadline = min(math.inf if timers.passive else timers.due_at, folders_due)
                with trio.CancelScope(deadline=deadline) as wake:
                    desk.listen(wake)
                    timers.wake = wake
                    try:
                        while True:
                            await imap.wait()
                            if (problem := imap.monitor.problem()) is not None:
                                raise imap.monitor.failure or ImapError(problem)
                            watch.announce("exists")
                    finally:
                        desk.unlisten()
                        timers.wake = None
                # Mail pushed just as the deadline passed: wait() checkpoints, so the
                # deadline can win over a wake-up that was already due. It was pushed,
                # so it is "exists".
                watch.announce("exists")
                if (request := desk.take()) is not None:
                    await _serve_fetch(imap, request)  # DONE, UID SEARCH, UID FETCH, IDLE
                    watch.announce("exists")
                now = trio.current_time()
                if now >= folders_due:
                    await watch.check_folders("tick")  # DONE, STATUS per folder, IDLE
                    watch.announce("exists")
                    now = trio.current_time()
                    folders_due = now + timers.tick_interval if watch.folders else math.inf
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
        f"{prefix(watch.conn.email)} server has no IDLE capability; polling every "
        f"{human_duration(t.tick_interval)}"
    )
    while True:
        watch.announce("exists")
        with desk.listening():
            await trio.sleep_until(next_tick)
        if (request := desk.take()) is not None:
            await _serve_fetch(imap, request)
            if trio.current_time() < next_tick:
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
