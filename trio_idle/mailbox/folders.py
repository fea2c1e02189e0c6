"""The folders a session watches beside its selected mailbox (``TRIO_IDLE_FOLDERS``).

The session IDLEs on one mailbox (``TRIO_IDLE_MAILBOX``, INBOX); every other watched
folder (``\\Junk`` resolved to the server's folder, :mod:`trio_idle.imap.folders`) is
checked on the same connection with ``STATUS <folder> (UIDNEXT UIDVALIDITY)`` — once
after SELECT, then once per tick — and a moved UIDNEXT or a new UIDVALIDITY requests a
scan of that folder. Each folder has what the selected mailbox has, per (connection,
folder): its accepted mark and last seen state (:class:`FolderMemory`), its own
coalescer (1 active + 1 pending per folder) and scan task, and its row in the state
store under the folder's name (INBOX rows keep their key), so the catch-up after a
reconnect or a restart works per folder. What this module decides is pure
(:func:`folder_decision`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

import attrs

from trio_idle.imap.responses import CatchUp, MailboxState, catch_up_decision
from trio_idle.mailbox.coalescer import ScanCoalescer
from trio_idle.state.catch_up import startup_decision
from trio_idle.state.records import ScannedState
from trio_idle.state.scan_range import ScanMark, ScanRange, advance, on_connect, scan_range


@attrs.define(eq=False)
class FolderMemory:
    """What outlives one session for one folder beside the selected mailbox."""

    #: the folder as the server names it (``[Gmail]/Spam``)
    name: str
    #: 1 active + 1 pending scan of this folder
    coalescer: ScanCoalescer = attrs.field(factory=ScanCoalescer)
    #: the folder as last checked (STATUS); None: not checked in this process yet
    mailbox: MailboxState | None = None
    #: every UID below ``mark.uidnext`` (in its UIDVALIDITY) was accepted by the backend
    mark: ScanMark | None = None
    last_scan: float | None = None

    def scan_range(self, covered: MailboxState | None) -> ScanRange:
        return scan_range(self.mark, covered)

    def accepted(self, covered: MailboxState) -> None:
        self.mark = advance(self.mark, covered)
        self.last_scan = time.time()


#: what a connection that watches no other folder holds: nothing of its own
_NONE: Final[Mapping[str, FolderMemory]] = MappingProxyType({})
_NO_NAMES: Final[Mapping[str, str]] = MappingProxyType({})


@attrs.define(eq=False, weakref_slot=False)  # one per connection: no weakref slot
class Folders:
    """A connection's folders beside the selected mailbox: their memories, the folders
    already reported missing (once per connection row, never in a loop), and the
    reconciler's hook that gives a new folder's coalescer its scan task.

    Every connection has one, most watch INBOX only: until a folder is made, it holds
    shared empty values and no container of its own."""

    _by_name: dict[str, FolderMemory] | None = None
    reported_missing: frozenset[str] = frozenset()
    #: the last connection's resolution: each wanted entry (``\\Junk``) → server folder
    resolved: Mapping[str, str] = _NO_NAMES
    #: called once for each folder made (the reconciler attaches its coalescer)
    on_new: Callable[[FolderMemory], None] = attrs.field(default=lambda folder: None, repr=False)

    @property
    def by_name(self) -> Mapping[str, FolderMemory]:
        return _NONE if self._by_name is None else self._by_name

    def get(self, name: str) -> FolderMemory:
        if self._by_name is None:
            self._by_name = {}
        folder = self._by_name.get(name)
        if folder is None:
            folder = self._by_name[name] = FolderMemory(name)
            self.on_new(folder)
        return folder

    def missing(self, wanted: str) -> bool:
        """Whether ``wanted`` is missing for the first time (then it is to be reported)."""
        if wanted in self.reported_missing:
            return False
        self.reported_missing = self.reported_missing | {wanted}
        return True

    def gone(self, name: str) -> bool:
        """Server folder ``name`` stopped existing while watched: whether that is news
        (then it is to be reported). The entries that resolved to it count as reported,
        so the next connection, not finding them, says nothing more."""
        wanted = [w for w, server in self.resolved.items() if server == name] or [name]
        news = any(w not in self.reported_missing for w in wanted)
        self.reported_missing = self.reported_missing | set(wanted)
        return news


@attrs.frozen
class FolderDecision:
    """What one STATUS answer means for a folder: scan or not, and why; the state a
    first check stores when nothing is to be scanned (``start_from=now``)."""

    catch_up: CatchUp
    reason: str
    store_now: bool = False


def folder_decision(
    folder: FolderMemory,
    current: MailboxState,
    stored: ScannedState | None,
    *,
    store_enabled: bool,
    start_from: str,
    reason: str,
) -> FolderDecision:
    """Scan ``folder`` now that STATUS says ``current``? Pure.

    First check in this process with a state store: as a restart (``startup``): the
    stored state against ``current``. First check without one: nothing to compare,
    what the folder holds counts as handled. Later checks (``reason``: ``reconnect``
    after a new connection, ``tick`` between two): a moved UIDNEXT or a changed
    UIDVALIDITY since the last check."""
    if folder.mailbox is None:
        if not store_enabled:
            return FolderDecision(CatchUp(False, "first check"), "startup")
        decision = startup_decision(stored, current, start_from)
        return FolderDecision(decision, "startup", store_now=stored is None and not decision.scan)
    return FolderDecision(catch_up_decision(folder.mailbox, current), reason)


def apply_check(
    folder: FolderMemory,
    current: MailboxState,
    stored: ScannedState | None,
    decision: FolderDecision,
) -> None:
    """Update ``folder`` after a check decided as ``decision``: its last seen state, and
    its mark (loaded from ``stored`` on the first check; set to ``current`` when nothing
    is scanned and none was known; lowered to a server that went back)."""
    if folder.mailbox is None and stored is not None and folder.mark is None:
        folder.mark = ScanMark(stored.uidvalidity, stored.uidnext)
    folder.mailbox = current
    folder.mark = on_connect(folder.mark, current, scanning=decision.catch_up.scan)
