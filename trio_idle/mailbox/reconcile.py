"""Keeping the running sessions equal to the connection list.

:func:`diff` is the pure decision; :class:`Reconciler` applies it. Task tree::

    root nursery (daemon)
    └── connection task  (one per connection id, started by the reconciler)
        └── child nursery, in its own CancelScope  ← cancelled to remove or restart
            │   this connection only (Handle.cancel: before the task ran, too)
            ├── a restarted connection's wait for its predecessor's end, then
            ├── IMAP session (connect / IDLE / reconnect loop)
            ├── scan task (webhook, retries): only while a scan is pending
            │   (started by the coalescer, ends when none is left)
            ├── folder sessions (TRIO_IDLE_FOLDER_WATCH=idle): one IMAP session per
            │   watched folder, each in its own CancelScope (started and stopped as
            │   the mailbox's session hands the resolved folders over), and each
            │   folder's scan task while one is pending
            └── health reporter (account health to the backend; unless switched off):
                only while a report is due or debounced

Cancelling a connection's scope ends its whole subtree: the session LOGOUTs under a
short shielded deadline, an in-flight scan request is abandoned. A restarted connection
(changed host, port, login or password) waits for its predecessor to finish first, so
one mailbox never holds two IMAP connections (Gmail allows 15 per account).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import attrs
import trio

from trio_idle.accounts.connections import MailConnection
from trio_idle.accounts.outcome_text import ConnectionSecrets
from trio_idle.backend.watch import BackendWatch
from trio_idle.backend.webhook import WebhookClient
from trio_idle.core.config import AccountHealthSettings, WebhookSettings
from trio_idle.core.logs import Logger, log_internal_error, prefix, session_logger
from trio_idle.imap.envelope import MAX_ENVELOPES, NewMail
from trio_idle.imap.responses import MailboxState
from trio_idle.mailbox.account_health import Health
from trio_idle.mailbox.coalescer import ScanCoalescer
from trio_idle.mailbox.folders import FolderMemory
from trio_idle.mailbox.health_reporter import (
    AccountHealth,
    StatusPolicy,
    iso_time,
    run_health_reports,
)
from trio_idle.mailbox.scan_worker import ScanHooks, ScanPolicy, run_scans
from trio_idle.mailbox.session import (
    ConnectionMemory,
    SessionEnv,
    run_folder_session,
    run_session,
)
from trio_idle.state.store import StateStore


@attrs.frozen
class Diff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff(running: Mapping[str, MailConnection], wanted: Mapping[str, MailConnection]) -> Diff:
    """Which ids to start, stop and restart. Pure; ids sorted for stable logs."""
    added = sorted(wanted.keys() - running.keys())
    removed = sorted(running.keys() - wanted.keys())
    # identity first: an unchanged row gives the very object that runs (ConnectionListBuilder),
    # and comparing 10,000 connections field by field is milliseconds of loop time
    changed = sorted(
        i
        for i in wanted.keys() & running.keys()
        if wanted[i] is not running[i] and wanted[i] != running[i]
    )
    return Diff(tuple(added), tuple(removed), tuple(changed))


def _no_folder_hook(folder: FolderMemory) -> None:
    """Between two connection subtrees no folder gets a scan task."""


def _no_folder_sessions(names: tuple[str, ...]) -> None:
    """Between two connection subtrees no folder gets a session of its own."""


@attrs.define(weakref_slot=False)
class Handle:
    """A running connection: its spec, the scope that owns its subtree, its state."""

    conn: MailConnection
    memory: ConnectionMemory
    coalescer: ScanCoalescer
    health: AccountHealth
    #: the folder sessions running in its subtree (idle mode), by server folder; None: none
    folder_scopes: dict[str, trio.CancelScope] | None = None
    #: the scope that owns its subtree once the connection task opened it: its child
    #: nursery's own cancel scope (one scope per connection, not one around the nursery
    #: as well). Until then whether :meth:`cancel` was called.
    _scope: trio.CancelScope | bool = False
    #: :attr:`finished` once a waiter made it; until then whether the connection task
    #: ended. Only a restarted connection's successor (and tests) wait for the end, so
    #: most connections never hold an Event.
    _finished: trio.Event | bool = False

    @property
    def finished(self) -> trio.Event:
        """Set once the connection task has ended, its whole subtree with it (at once,
        if that happened before the first call)."""
        finished = self._finished
        if isinstance(finished, trio.Event):
            return finished
        event = self._finished = trio.Event()
        if finished:
            event.set()
        return event

    def ended(self) -> None:
        """The connection task ends: :attr:`finished` is set, now or when first made."""
        if isinstance(self._finished, trio.Event):
            self._finished.set()
        else:
            self._finished = True

    def cancel(self) -> None:
        """End the connection's whole subtree (removed, restarted, shutdown). Works
        before the connection task ran: its nursery is then cancelled as it opens, so
        the session never connects. Synchronous, idempotent."""
        scope = self._scope
        if isinstance(scope, trio.CancelScope):
            scope.cancel()
        else:
            self._scope = True

    def owns(self, scope: trio.CancelScope) -> None:
        """The connection task opened its nursery: ``scope`` (the nursery's) is the
        connection's from now on, cancelled at once if :meth:`cancel` came first."""
        cancelled = self._scope is True
        self._scope = scope
        if cancelled:
            scope.cancel()


#: new connections :meth:`Reconciler.apply_gradually` starts between two checkpoints
#: (the loop time a step costs: docs/performance.md, "Figures behind the code")
START_STEP: Final = 200


class Reconciler:
    """Starts, stops and restarts connection subtrees in a nursery it does not own."""

    def __init__(
        self,
        nursery: trio.Nursery,
        env: SessionEnv,
        webhook: WebhookClient,
        *,
        webhook_settings: WebhookSettings,
        account_health: AccountHealthSettings,
    ) -> None:
        self._nursery = nursery
        self._env = env
        self._webhook = webhook
        self.handles: dict[str, Handle] = {}
        #: stop_all was called: nothing starts any more
        self._stopped = False
        w = webhook_settings
        self._policy = ScanPolicy(env.imap.mailbox, w.scan_retry_initial, w.scan_retry_max)
        self._scan_envelopes = w.scan_envelopes
        self._unreachable_after = account_health.unreachable_after
        self._status_policy: StatusPolicy | None = None
        #: every connection's ``on_delivered``: one bound method, not a closure each
        self._health_delivered = self._record_health
        if account_health.connection_status:
            self._status_policy = StatusPolicy(
                w.backend_url + account_health.status_path,
                w.scan_retry_initial,
                w.scan_retry_max,
            )

    @property
    def backend(self) -> BackendWatch:
        """Whether the backend answers the scans and reports (fed by the webhook client)."""
        return self._webhook.backend

    @property
    def store(self) -> StateStore | None:
        return self._env.store

    @property
    def running(self) -> dict[str, MailConnection]:
        return {i: h.conn for i, h in self.handles.items()}

    def apply(self, wanted: Mapping[str, MailConnection]) -> Diff:
        """Bring the running set in line with ``wanted``. Synchronous: never blocks."""
        d = self._stop_and_restart(wanted)
        for conn_id in d.added:
            self._start(wanted[conn_id], predecessor=None)
        return d

    async def apply_gradually(
        self, wanted: Mapping[str, MailConnection], step: int = START_STEP
    ) -> Diff:
        """:meth:`apply`, but new connections are started ``step`` at a time with a
        checkpoint between: starting 10,000 sessions in one synchronous call (and running
        their first steps in one scheduler batch) stopped the loop for 0.3–0.4 s. Removed
        and changed connections are handled at once, as by :meth:`apply`.

        Only one caller may apply at a time (the refresh loop); :meth:`stop_all` meanwhile
        ends it (nothing more is started). Cancelled, the connections not started yet are
        started by the next call. Returns the whole diff.
        """
        d = self._stop_and_restart(wanted)
        await self.start_gradually(d.added, wanted.get, step)
        return d

    async def start_gradually(
        self,
        ids: Iterable[str],
        current: Callable[[str], MailConnection | None],
        step: int = START_STEP,
    ) -> list[str]:
        """Start the connections ``ids`` names that do not run yet, ``step`` at a time
        with a checkpoint between (see :meth:`apply_gradually`).

        Each one is looked up with ``current`` right before it would start, so what
        changed during an earlier step counts: ``None`` (not wanted any more) skips it,
        one running by then is not started again, and the connection ``current`` returns
        then is the one started. Nothing starts after :meth:`stop_all`. Cancelled, it
        starts nothing more. Returns the ids it started, in order.

        One starter at a time: the refresh loop (through :meth:`apply_gradually`), or in
        shared mode the share starter; a synchronous :meth:`apply` that only stops (the
        membership's reshare) may run between two steps.
        """
        started: list[str] = []
        since_checkpoint = 0
        for conn_id in ids:
            if since_checkpoint == step:
                # the new sessions take their first step, and I/O is served
                await trio.lowlevel.checkpoint()
                since_checkpoint = 0
            if self._stopped:
                break
            conn = current(conn_id)
            if conn is None or conn_id in self.handles:
                continue
            self._start(conn, predecessor=None)
            started.append(conn_id)
            since_checkpoint += 1
        return started

    def _stop_and_restart(self, wanted: Mapping[str, MailConnection]) -> Diff:
        d = diff(self.running, wanted)
        for conn_id in d.removed:
            self.handles.pop(conn_id).cancel()
        for conn_id in d.changed:
            old = self.handles.pop(conn_id)
            old.cancel()
            self._start(wanted[conn_id], predecessor=old)
        return d

    def stop_all(self) -> None:
        self._stopped = True
        for handle in self.handles.values():
            handle.cancel()
        self.handles.clear()

    def _start(self, conn: MailConnection, predecessor: Handle | None) -> None:
        memory = predecessor.memory if predecessor else ConnectionMemory()
        # a credentials restart keeps the pending scan: mail announced must still be scanned
        coalescer = predecessor.coalescer if predecessor else ScanCoalescer()
        # ... and its health: what the backend was told is not told again
        if predecessor is not None:
            health = predecessor.health
        else:
            health = self._new_health(conn)
            memory.on_outcome = health  # its observe
        handle = Handle(conn, memory, coalescer, health)
        self.handles[conn.id] = handle
        self._nursery.start_soon(self._run, handle, predecessor, name=f"conn:{conn.id}")

    def _new_health(self, conn: MailConnection) -> AccountHealth:
        """A connection's account health, seeded with what the backend was told before
        the restart and keeping what it is told from now on (the state store's)."""
        unreachable_after = self._unreachable_after
        store = self._env.store
        if store is None or not store.enabled:
            return AccountHealth(conn, unreachable_after)
        stored = store.reported_health(conn.id)
        return AccountHealth(
            conn,
            unreachable_after,
            reported=None if stored is None else Health(stored.state, stored.reason),
            on_delivered=self._health_delivered,
        )

    def _record_health(self, conn_id: str, health: Health) -> None:
        """What the backend accepted for ``conn_id``, kept for the next start."""
        store = self._env.store
        if store is not None:
            store.record_health(conn_id, health.state, health.reason)

    async def _run(self, handle: Handle, predecessor: Handle | None) -> None:
        conn = handle.conn
        log = session_logger(conn.email, conn.id, conn.host)
        try:
            # the nursery's own cancel scope is the connection's scope (Handle.cancel):
            # the wait for a predecessor runs inside it, so cancelling it ends that too
            async with trio.open_nursery() as nursery:
                handle.owns(nursery.cancel_scope)
                if predecessor is not None:
                    await predecessor.finished.wait()
                    # only now: the old session's outcomes were classified with the old row
                    handle.health.rebind(conn)
                subtree = _Subtree(self, nursery, handle, log)
                handle.coalescer.attach(subtree.start_scans)
                if self._status_policy is not None:
                    handle.health.attach(subtree.start_reports)
                folders = handle.memory.folders
                folders.on_new = subtree.attach_folder
                folders.on_own = subtree.own_folders
                for folder in folders.by_name.values():  # a credentials restart's
                    self._attach_folder(nursery, handle, log, folder)
                try:
                    await run_session(conn, self._env, handle.coalescer, handle.memory, log)
                finally:
                    handle.coalescer.detach()
                    handle.health.detach()
                    folders.on_new = _no_folder_hook
                    folders.on_own = _no_folder_sessions
                    handle.folder_scopes = None
                    for folder in folders.by_name.values():
                        folder.coalescer.detach()
        except Exception as exc:  # belt and braces: one connection never takes down the rest
            self._env.stats.inc("internal_errors")
            log_internal_error(
                log,
                f"{prefix(conn.email)} connection task crashed:",
                exc,
                ConnectionSecrets.of(conn),
            )
            if self.handles.get(conn.id) is handle:
                del self.handles[conn.id]  # the next refresh starts it again
        finally:
            handle.ended()

    def _start_scans(self, nursery: trio.Nursery, handle: Handle, log: Logger) -> None:
        """The coalescer's starter: a scan task only while scans are pending."""
        nursery.start_soon(
            run_scans,
            handle.conn,
            handle.coalescer,
            self._webhook,
            self._policy,
            self._env.stats,
            log,
            self._env.rng,
            self._hooks(handle),
            name=f"scan:{handle.conn.id}",
        )

    def _attach_folder(
        self, nursery: trio.Nursery, handle: Handle, log: Logger, folder: FolderMemory
    ) -> None:
        """A watched folder's coalescer gets its scan task's starter, as the mailbox's."""
        folder.coalescer.attach(
            functools.partial(self._start_folder_scans, nursery, handle, log, folder)
        )

    def _own_folders(
        self, nursery: trio.Nursery, handle: Handle, log: Logger, names: tuple[str, ...]
    ) -> None:
        """The mailbox's session resolved its folders: exactly ``names`` have a session
        of their own from now on (in this connection's nursery, each in its own scope:
        one no longer handed over is cancelled and LOGOUTs; removing the connection
        cancels them all with it). Synchronous; a folder that keeps its session is not
        disturbed (the mailbox's reconnects do not touch the folders' connections)."""
        running = handle.folder_scopes or {}
        for name in [n for n in running if n not in names]:
            running.pop(name).cancel()
        for name in names:
            if name not in running:
                scope = running[name] = trio.CancelScope()
                nursery.start_soon(
                    self._run_folder, handle, log, name, scope, name=f"folder:{handle.conn.id}"
                )
        handle.folder_scopes = running or None

    async def _run_folder(
        self, handle: Handle, log: Logger, name: str, scope: trio.CancelScope
    ) -> None:
        """One folder's own session until its scope or the connection's is cancelled, or
        the server refuses the folder (reported once per row, as a folder STATUS refused)."""
        conn = handle.conn
        folders = handle.memory.folders
        with scope:
            try:
                # made here if new: its coalescer gets its scan task (on_new)
                await run_folder_session(conn, self._env, folders.get(name), log)
                if folders.gone(name):
                    self._env.stats.inc("folders_missing")
                    log.bind(error_kind="folder_missing").warning(
                        f"{prefix(conn.email)} folder {name} no longer exists "
                        "(EXAMINE refused): not watched"
                    )
            except Exception as exc:  # one folder's bug never ends the connection's subtree
                self._env.stats.inc("internal_errors")
                log_internal_error(
                    log,
                    f"{prefix(conn.email)} folder session crashed:",
                    exc,
                    ConnectionSecrets.of(conn),
                )
            finally:
                # ended on its own: the next hand-over naming it starts it again
                running = handle.folder_scopes
                if running is not None and running.get(name) is scope:
                    del running[name]

    def _start_folder_scans(
        self, nursery: trio.Nursery, handle: Handle, log: Logger, folder: FolderMemory
    ) -> None:
        """A folder's coalescer's starter: its own scan task, while its scans are pending
        (1 active + 1 pending per folder); its scans name the folder."""
        store, conn_id = self._env.store, handle.conn.id

        def on_success(covered: MailboxState) -> None:
            folder.accepted(covered)
            if store is not None:
                store.record(conn_id, folder.name, covered.uidvalidity, covered.uidnext)

        command_timeout = self._env.timers.command_timeout

        async def new_mail(since_uid: int) -> NewMail | None:
            # served by the folder's own session (idle mode) or by the mailbox session's
            # visit to the folder (EXAMINE ... SELECT back); either has its own deadline
            with trio.move_on_after(2 * command_timeout):
                return await folder.desk.ask(since_uid, MAX_ENVELOPES)
            return None

        hooks = ScanHooks(
            pacer=self._env.catchup_pacer,
            covered=lambda: folder.mailbox,
            on_success=on_success,
            range_for=folder.scan_range,
            new_mail=new_mail if self._scan_envelopes else None,
        )
        nursery.start_soon(
            run_scans,
            handle.conn,
            folder.coalescer,
            self._webhook,
            attrs.evolve(self._policy, mailbox=folder.name, folder=folder.name),
            self._env.stats,
            log,
            self._env.rng,
            hooks,
            name=f"scan:{conn_id}:{folder.name}",
        )

    def _start_reports(self, nursery: trio.Nursery, handle: Handle, log: Logger) -> None:
        """The account health's starter: a reporter only while a report is due."""
        assert self._status_policy is not None  # attached only with reports switched on
        nursery.start_soon(
            run_health_reports,
            handle.health,
            self._webhook,
            self._status_policy,
            self._env.stats,
            log,
            self._env.rng,  # one per process: it only spreads retries
            name=f"health:{handle.conn.id}",
        )

    def _hooks(self, handle: Handle) -> ScanHooks:
        store, mailbox, conn_id = self._env.store, self._policy.mailbox, handle.conn.id
        memory = handle.memory
        command_timeout = self._env.timers.command_timeout

        def on_success(covered: MailboxState) -> None:
            # only a 2xx advances the accepted mark, here and across restarts (the
            # store's "scanned up to" is the persisted mark)
            memory.accepted(covered)
            if store is not None:
                store.record(conn_id, mailbox, covered.uidvalidity, covered.uidnext)

        async def new_mail(since_uid: int) -> NewMail | None:
            # the session's fetch has its own command deadline; this bounds the wait for it
            with trio.move_on_after(2 * command_timeout):
                return await memory.desk.ask(since_uid, MAX_ENVELOPES)
            return None

        return ScanHooks(
            pacer=self._env.catchup_pacer,
            covered=lambda: memory.mailbox,
            on_success=on_success,
            range_for=memory.scan_range,
            new_mail=new_mail if self._scan_envelopes else None,
        )

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-connection detail for ``/status`` (no secrets)."""
        out = []
        for conn_id, h in sorted(self.handles.items()):
            out.append(
                {
                    "id": conn_id,
                    "email": h.conn.email,
                    "host": f"{h.conn.host}:{h.conn.port}",
                    "state": h.memory.state,
                    "last_error": h.memory.last_error,
                    "health": h.health.snapshot(),
                    "last_push": _iso(h.memory.last_push),
                    "last_scan": _iso(h.memory.last_scan),
                    "sessions": h.memory.sessions,
                    "scan_active": h.coalescer.active,
                    "scan_pending": bool(h.coalescer.pending),
                    # the folders beside INBOX (TRIO_IDLE_FOLDERS) this process has seen
                    "folders": [
                        {
                            "name": f.name,
                            # status: checked on the mailbox's connection; else the
                            # state of the folder's own session (idle mode)
                            "watch": f.state if f.own_connection else "status",
                            "uidnext": None if f.mailbox is None else f.mailbox.uidnext,
                            "last_scan": _iso(f.last_scan),
                            "scan_active": f.coalescer.active,
                            "scan_pending": bool(f.coalescer.pending),
                        }
                        for f in h.memory.folders.by_name.values()
                    ],
                }
            )
        return out


@attrs.define(eq=False, weakref_slot=False)
class _Subtree:
    """A running connection's nursery and what its starters need: the starters handed to
    the coalescer, the account health and the folders are bound methods of this one
    small object (a partial each cost its argument tuple and keyword dict too)."""

    reconciler: Reconciler
    nursery: trio.Nursery
    handle: Handle
    log: Logger

    def start_scans(self) -> None:
        self.reconciler._start_scans(self.nursery, self.handle, self.log)

    def start_reports(self) -> None:
        self.reconciler._start_reports(self.nursery, self.handle, self.log)

    def attach_folder(self, folder: FolderMemory) -> None:
        self.reconciler._attach_folder(self.nursery, self.handle, self.log, folder)

    def own_folders(self, names: tuple[str, ...]) -> None:
        self.reconciler._own_folders(self.nursery, self.handle, self.log, names)


def _iso(unix: float | None) -> str | None:
    return None if unix is None else iso_time(unix)
