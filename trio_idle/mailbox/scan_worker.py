"""Sends a connection's scans, one at a time, retrying while the scan stays active.

A worker task takes a connection's scans from its
:class:`~trio_idle.mailbox.coalescer.ScanCoalescer`: :func:`run_scans`, started on demand by the
coalescer's starter (:meth:`~trio_idle.mailbox.coalescer.ScanCoalescer.attach`) and only while a
scan is wanted. A failed attempt that is worth retrying
(5xx, 429, timeout, refused) is retried with backoff — honouring ``Retry-After`` — while
new requests pile up into the single pending slot, so a backend outage costs each
mailbox at most one waiting scan, never a queue.

Each scan carries the range of the mail it covers (:mod:`trio_idle.state.scan_range`), fixed
when it starts and kept across its retries; only a 2xx moves the accepted mark
(:attr:`ScanHooks.on_success`), so a scan that fails for good leaves its range to the next
one. With envelopes switched on (``TRIO_IDLE_SCAN_ENVELOPES``) the worker first asks the
session for the new mail's envelopes (:attr:`ScanHooks.new_mail`); whatever that fetch
finds raises the range's upper end to its highest UID + 1.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import attrs
import trio

from trio_idle.accounts.connections import MailConnection
from trio_idle.backend.webhook import ScanJob, Verdict, WebhookClient
from trio_idle.core.backoff import BackoffPolicy
from trio_idle.core.limiter import Pacer
from trio_idle.core.logs import Logger, human_duration
from trio_idle.core.logs import prefix as log_prefix
from trio_idle.core.stats import Stats
from trio_idle.imap.envelope import Envelope, NewMail
from trio_idle.imap.responses import MailboxState
from trio_idle.mailbox.coalescer import PACED_REASONS, ScanCoalescer
from trio_idle.state.scan_range import NO_RANGE, ScanRange

#: scan retries wait in the upper half of ``[initial, bound]`` (:mod:`trio_idle.core.backoff`):
#: spread enough that mailboxes retrying one backend outage do not all arrive at once
SCAN_RETRY_JITTER = 0.5


@attrs.frozen
class ScanPolicy:
    mailbox: str
    retry_initial: float
    retry_max: float
    #: the folder scanned when it is not the session's selected mailbox (the body's
    #: ``folder``; :mod:`trio_idle.mailbox.folders`), else None
    folder: str | None = None


@attrs.frozen
class ScanHooks:
    """How a worker paces catch-up scans and reports what a successful scan covered.

    ``covered()`` is read when a scan starts (the mailbox state it will cover);
    ``range_for(covered)`` gives the range fields it carries; ``on_success(state)`` is
    called after the backend answered 2xx for it. ``new_mail(since_uid)``, when set,
    returns what arrived from that UID on (envelopes included), or None when it cannot
    be had now; it must return within its own bound.
    """

    pacer: Pacer | None = None
    covered: Callable[[], MailboxState | None] = lambda: None
    on_success: Callable[[MailboxState], None] = lambda state: None
    range_for: Callable[[MailboxState | None], ScanRange] = lambda state: NO_RANGE
    new_mail: Callable[[int], Awaitable[NewMail | None]] | None = None


async def run_scans(
    conn: MailConnection,
    coalescer: ScanCoalescer,
    webhook: WebhookClient,
    policy: ScanPolicy,
    stats: Stats,
    log: Logger,
    rng: random.Random,
    hooks: ScanHooks | None = None,
) -> None:
    """The task a :meth:`ScanCoalescer.attach` starter starts: take the pending scan and
    deliver it, one at a time, while one is pending, then return (and call
    :meth:`ScanCoalescer.task_ended` however it ends). Cancellation ends it at any point; a
    scan not taken yet stays pending for the next task.

    Catch-up scans (``startup``/``reconnect``) first wait for a global pacer slot, unless
    new mail (EXISTS/tick) arrives meanwhile: then the scan goes at once, as ``exists``.
    """
    worker = _ScanWorker(conn, coalescer, webhook, policy, stats, log, rng, hooks or ScanHooks())
    try:
        while True:
            # cancelled, a pending scan is not taken (and so not lost)
            await trio.lowlevel.checkpoint_if_cancelled()
            reason = coalescer.take_next()
            if reason is None:
                return
            await worker.scan(reason)
    finally:
        coalescer.task_ended()


@attrs.frozen
class _ScanWorker:
    """What every scan of one connection's worker task needs (:func:`run_scans`)."""

    conn: MailConnection
    coalescer: ScanCoalescer
    webhook: WebhookClient
    policy: ScanPolicy
    stats: Stats
    log: Logger
    rng: random.Random
    hooks: ScanHooks

    async def scan(self, reason: str) -> None:
        """One taken (active) scan: pace it, fix its range, deliver it; always ``done()``."""
        hooks, stats = self.hooks, self.stats
        try:
            pacer = hooks.pacer if reason in PACED_REASONS else None
            if pacer is not None and await self.coalescer.wait_paced(pacer):
                reason = "exists"
            covered = hooks.covered()
            span = hooks.range_for(covered)
            messages: tuple[Envelope, ...] | None = None
            if hooks.new_mail is not None and span.since_uid is not None:
                found = await hooks.new_mail(span.since_uid)
                if found is not None:
                    messages = found.envelopes
                    stats.inc("envelope_fetches", "listed" if messages is not None else "range")
                    if found.uids and covered is not None and covered.uidnext is not None:
                        # the backend's own search comes later, so it sees these too
                        top = max(covered.uidnext, found.uids[-1] + 1)
                        covered = attrs.evolve(covered, uidnext=top)
                else:
                    stats.inc("envelope_fetches", "unavailable")
            delivered = await self.deliver(reason, span, messages)
            if delivered and covered is not None:
                hooks.on_success(covered)
        finally:
            self.coalescer.done()

    async def deliver(
        self,
        reason: str,
        span: ScanRange = NO_RANGE,
        messages: tuple[Envelope, ...] | None = None,
    ) -> bool:
        """Send one scan until the backend answers 2xx (True) or refuses it for good
        (False)."""
        conn, policy, stats, log = self.conn, self.policy, self.stats, self.log
        job = ScanJob(
            conn.id,
            conn.user_id,
            conn.email,
            policy.mailbox,
            reason,
            span=span,
            messages=messages,
            folder=policy.folder,
        )
        prefix = log_prefix(conn.email)
        # the id the backend sees as x-scan-id: every line of this scan names it, so the
        # scan can be followed into the backend's logs
        scan = f"(scan {job.scan_id})"
        if policy.folder is not None:  # at the end: the line's event is still its start
            scan = f"(folder {policy.folder}) {scan}"
        retry = BackoffPolicy(policy.retry_initial, policy.retry_max, jitter=SCAN_RETRY_JITTER)
        attempt = 0
        while True:
            attempt += 1
            stats.inc("scans_sent", reason)
            reply = await self.webhook.send(job)
            if reply.verdict is Verdict.OK:
                stats.inc("scans_ok")
                took = None
                if self.coalescer.active_since is not None:
                    took = trio.current_time() - self.coalescer.active_since
                    stats.scan_latency.observe(took)
                done = log.bind(scan_id=job.scan_id, duration=took)
                if reply.scanned is None:
                    done.warning(f"{prefix} scan-triggered → {reply.detail} {scan}")
                else:
                    done.info(
                        f"{prefix} scan-triggered → scanned={reply.scanned} "
                        f"blocked={reply.blocked} {scan}"
                    )
                return True
            label = str(reply.status) if reply.status is not None else "network"
            failed = log.bind(
                scan_id=job.scan_id, error_kind=f"http_{label}" if reply.status else label
            )
            if reply.verdict is Verdict.REJECT:
                stats.inc("scans_failed", label)
                failed.error(f"{prefix} scan rejected: {reply.detail} {scan}")
                return False
            stats.inc("scans_retried", label)
            delay = retry.delay(attempt, self.rng, hint=reply.retry_after)
            failed.bind(duration=delay).warning(
                f"{prefix} scan failed: {reply.detail}; retrying in "
                f"{human_duration(delay)} (attempt {attempt + 1}) {scan}"
            )
            await trio.sleep(delay)
