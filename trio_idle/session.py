"""One mailbox's IMAP session: connect, LOGIN, SELECT, IDLE — and reconnect forever.

This is where new mail is noticed and a scan requested (:func:`_announce`):
- an ``EXISTS`` pushed during IDLE (reason ``exists``);
- the tick (every ``tick_interval``, jittered): leave IDLE, ``NOOP`` and re-enter IDLE, all
  three under one deadline — a missing answer means a dead (half-open) connection — and
  scan if the count grew meanwhile (reason ``tick``; catches servers that never push);
- a (re)connect whose SELECT shows a moved ``UIDNEXT`` or a new ``UIDVALIDITY`` compared
  with what the previous session saw (reason ``reconnect``).

IDLE is re-issued every ``idle_renew_interval`` (servers drop it at 29 min). Servers
without the IDLE capability are polled with NOOP at the tick interval.

All IMAP I/O goes through ``SessionEnv.connector`` (:mod:`trio_idle.imap_connector`):
the daemon's opens real connections, tests use a scripted fake under a virtual clock.

Cancellation (connection removed, credentials changed, shutdown) ends the session with a
LOGOUT written at once; a shielded scope waits up to ``logout_timeout`` for the server to
hang up, then the socket is closed (:meth:`~trio_idle.imap_connector.ImapLink.logout`).
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Callable
from typing import Any

import attrs
import trio

from trio_idle.account_health import Connected
from trio_idle.backoff import Backoff, BackoffPolicy
from trio_idle.coalescer import ScanCoalescer
from trio_idle.config import Settings
from trio_idle.connections import MailConnection
from trio_idle.errors import ImapAuthError, ImapError
from trio_idle.imap_client import ImapLimits, ImapTimeouts, connect, resolve_security
from trio_idle.imap_connector import ImapConnector, ImapLink
from trio_idle.imap_responses import MailboxState, catch_up_decision
from trio_idle.limiter import ConnectLimiter, Pacer
from trio_idle.logs import human_duration, log_internal_error, prefix
from trio_idle.providers import session_settings
from trio_idle.session_states import AUTH_FAILED, BACKOFF, CONNECTING, IDLE, POLLING
from trio_idle.state_store import StateStore, startup_decision
from trio_idle.stats import Stats


@attrs.define
class ConnectionMemory:
    """What outlives one IMAP session of a connection (and a credentials restart)."""

    #: mailbox as last seen; ``uidnext`` is a lower bound advanced on every announced mail
    mailbox: MailboxState | None = None
    state: str = CONNECTING
    last_error: str | None = None
    connected_since: float | None = None
    sessions: int = 0
    #: told each outcome that says something about the account's health: a
    #: :class:`~trio_idle.account_health.Connected`, or the error that ended an attempt
    #: (:class:`~trio_idle.health_reporter.AccountHealth.observe`). Must never block.
    on_outcome: Callable[[object], None] = attrs.field(
        default=lambda outcome: None, repr=False, eq=False
    )


def network_connector(settings: Settings, ssl_context: ssl.SSLContext | None) -> ImapConnector:
    """The daemon's connector: :func:`trio_idle.imap_client.connect` with the configured
    security (``auto`` resolved per port), TLS context, timeouts, read limits and refused
    networks."""
    timeouts = ImapTimeouts(
        connect=settings.timers.connect_timeout,
        command=settings.timers.command_timeout,
        keepalive_idle=settings.imap.tcp_keepalive,
    )
    limits = ImapLimits(max_line=settings.imap.max_line, max_literal=settings.imap.max_literal)

    async def open_link(conn: MailConnection) -> ImapLink:
        security = resolve_security(conn.security or settings.imap.imap_security, conn.port)
        return await connect(
            conn,
            security=security,
            context=None if security == "plain" else ssl_context,
            timeouts=timeouts,
            refuse=settings.imap.refuse_networks,
            limits=limits,
        )

    return open_link


@attrs.frozen
class SessionEnv:
    """What all sessions share: settings, the connect limiter, TLS context, counters,
    and the connector that opens their IMAP connections."""

    settings: Settings
    limiter: ConnectLimiter
    ssl_context: ssl.SSLContext | None
    stats: Stats
    rng: random.Random = attrs.field(factory=random.Random)
    #: persisted "scanned up to" state (restart catch-up); None: no persistence
    store: StateStore | None = None
    #: global pace of catch-up scans (startup/reconnect); None: unpaced
    catchup_pacer: Pacer | None = None
    #: opens one mailbox's IMAP connection; default: :func:`network_connector`
    connector: ImapConnector = attrs.field(
        default=attrs.Factory(
            lambda env: network_connector(env.settings, env.ssl_context), takes_self=True
        )
    )


async def run_session(
    conn: MailConnection,
    env: SessionEnv,
    coalescer: ScanCoalescer,
    memory: ConnectionMemory,
    log: Any,
) -> None:
    """Keep one IMAP session alive until cancelled. Never returns otherwise."""
    s = env.settings
    where = prefix(conn.email)
    # Error texts quote the server (and aioimaplib quotes our LOGIN line back): every one
    # is scrubbed of this connection's password before it is stored or logged.
    scrub = conn.scrubber()
    backoff = Backoff(
        BackoffPolicy(
            s.backoff.backoff_initial, s.backoff.backoff_max, s.backoff.backoff_reset_after
        ),
        env.rng,
    )
    auth_backoff = Backoff(
        BackoffPolicy(s.backoff.auth_backoff, s.backoff.auth_backoff_max, float("inf")), env.rng
    )
    while True:
        memory.state = CONNECTING
        imap: ImapLink | None = None
        up_since: float | None = None
        try:
            async with env.limiter.slot(conn.host):
                env.stats.inc("connect_attempts")
                imap = await env.connector(conn)
                await imap.login(conn.login, conn.password.reveal())
            selected = await imap.select(s.imap.mailbox)
            up_since = trio.current_time()
            auth_backoff.attempt = 0
            memory.sessions += 1
            memory.connected_since = up_since
            memory.last_error = None
            env.stats.inc("connects")
            log.info(f"{where} connected ({conn.host}:{conn.port})")
            if memory.mailbox is None and env.store is not None and env.store.enabled:
                # first session in this process: compare with what the last run scanned
                stored = env.store.get(conn.id, s.imap.mailbox)
                decision, reason = startup_decision(stored, selected), "startup"
            else:
                decision, reason = catch_up_decision(memory.mailbox, selected), "reconnect"
            memory.mailbox = selected
            if decision.scan:
                log.info(f"{where} catch-up scan ({decision.why})")
                env.stats.inc("catch_up_scans", reason)
                coalescer.request(reason)
            await _watch(imap, conn, env, coalescer, memory, log)
        except ImapAuthError as exc:
            memory.state = AUTH_FAILED
            memory.last_error = text = scrub(exc)
            memory.on_outcome(exc)
            env.stats.inc("auth_failures")
            delay = auth_backoff.next_delay()
            log.error(
                f"{where} authentication failed: {text} — check the stored password; "
                f"next login attempt in {human_duration(delay)}"
            )
        except ImapError as exc:
            memory.state = BACKOFF
            memory.last_error = text = scrub(exc)
            memory.on_outcome(exc)
            if up_since is not None:
                env.stats.inc("disconnects")
                backoff.session_ended(trio.current_time() - up_since)
                log.warning(f"{where} connection lost: {text}")
            else:
                env.stats.inc("connect_failures")
                log.warning(f"{where} connect failed: {text}")
            delay = backoff.next_delay()
        except Exception as exc:  # a bug must cost one mailbox a reconnect, not the process
            memory.state = BACKOFF
            memory.last_error = f"internal error: {type(exc).__name__}"
            env.stats.inc("internal_errors")
            log_internal_error(log, where, exc, scrub)
            delay = backoff.next_delay()
        finally:
            memory.connected_since = None
            if imap is not None:
                with trio.CancelScope(shield=True):
                    await imap.logout(s.timers.logout_timeout)
        if memory.state == BACKOFF:
            log.info(
                f"{where} reconnecting in {human_duration(delay)} (attempt {backoff.attempt + 1})"
            )
        await trio.sleep(delay)


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


def _announce(
    conn: MailConnection,
    imap: ImapLink,
    memory: ConnectionMemory,
    coalescer: ScanCoalescer,
    env: SessionEnv,
    log: Any,
    reason: str,
) -> None:
    """Request a scan for mail the monitor counted since the last call, if any."""
    count = imap.monitor.take_new_mail()
    if not count:
        return
    env.stats.inc("exists_events", reason)
    if memory.mailbox is not None and memory.mailbox.uidnext is not None:
        memory.mailbox = attrs.evolve(
            memory.mailbox, uidnext=memory.mailbox.uidnext + count, exists=imap.monitor.exists
        )
    if reason == "exists":
        log.info(f"{prefix(conn.email)} exists-event received (new mail)")
    else:
        log.info(f"{prefix(conn.email)} {reason}: {count} new message(s) found")
    if not coalescer.request(reason):
        env.stats.inc("scans_coalesced")


async def _watch(
    imap: ImapLink,
    conn: MailConnection,
    env: SessionEnv,
    coalescer: ScanCoalescer,
    memory: ConnectionMemory,
    log: Any,
) -> None:
    s = session_settings(env.settings, conn.provider)  # a provider's shorter IDLE timers
    where = prefix(conn.email)
    next_tick, renew_at = first_timers(
        trio.current_time(), s.timers.tick_interval, s.timers.idle_renew_interval, env.rng
    )
    if not imap.has_idle:
        memory.state = POLLING
        memory.on_outcome(Connected(idle=False))
        log.warning(
            f"{where} server has no IDLE capability; polling every "
            f"{human_duration(s.timers.tick_interval)}"
        )
        while True:
            _announce(conn, imap, memory, coalescer, env, log, "exists")
            await trio.sleep_until(next_tick)
            await imap.noop()
            _announce(conn, imap, memory, coalescer, env, log, "tick")
            next_tick = trio.current_time() + s.timers.tick_interval
    _announce(conn, imap, memory, coalescer, env, log, "exists")
    await imap.idle_start()
    memory.state = IDLE
    memory.on_outcome(Connected(idle=True))
    while True:
        with trio.move_on_at(min(next_tick, renew_at)):
            while True:
                await imap.monitor.wait()
                if (problem := imap.monitor.problem()) is not None:
                    raise ImapError(problem)
                _announce(conn, imap, memory, coalescer, env, log, "exists")
        # Mail pushed just as the deadline passed: wait() checkpoints, so the deadline
        # can win over a wake-up that was already due. It was pushed, so it is "exists".
        _announce(conn, imap, memory, coalescer, env, log, "exists")
        now = trio.current_time()
        tick = now >= next_tick
        if now >= renew_at:
            log.info(
                f"{where} idle renewing ({human_duration(s.timers.idle_renew_interval)} threshold)"
            )
            renew_at = now + s.timers.idle_renew_interval
        # DONE, NOOP (on a tick), IDLE: mail counted meanwhile is announced after, as "tick"
        await imap.restart_idle(noop=tick)
        if tick:
            next_tick = trio.current_time() + s.timers.tick_interval
        _announce(conn, imap, memory, coalescer, env, log, "tick" if tick else "exists")
