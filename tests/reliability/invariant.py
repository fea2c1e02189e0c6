"""The reliability invariant, as a reusable checker.

    Every message appended to a watched mailbox is followed by at least one scan POST for
    that mailbox that STARTS AFTER the append (and that the backend answered 2xx), and
    whose range includes it: no ``sinceUid``, ``uidValidityChanged``, or the append's
    UIDVALIDITY with ``sinceUid`` at or below its UID (docs/backend-contract.md).

"Starts after" compares :attr:`ScanRequest.received_at` (set by the backend when the request
has arrived) with :func:`trio.current_time` taken right after :meth:`ImapTestServer.append`
returned: both are the trio clock of this one process. A POST that was already under way
when the mail arrived does not count — its scan may have looked at the mailbox before the
message was there. A POST answered 5xx/429 (or never answered) does not count either: the
backend did not scan.

Usage::

    ledger = Ledger(server, backend)
    ledger.append("a@x.test", note="during restart")
    ledger.expunge_handled("a@x.test", note="during an outage")  # old mail goes away
    ...
    await ledger.settle(10, context=f"seed={seed}")   # waits, then asserts with a report
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import attrs
import trio
from trio_idle_testing import ImapTestServer
from trio_idle_testing.backend import ScanBackend, ScanRequest
from trio_idle_testing.imap_store import Message

_numbers = itertools.count(1)


@attrs.frozen
class Append:
    """One message put into a mailbox by the test."""

    user: str
    uid: int
    at: float  # trio.current_time() right after the append
    note: str = ""
    uidvalidity: int | None = None
    #: the folder it was filed into (a scan of another folder does not cover it)
    mailbox: str = "INBOX"


def in_range(request: ScanRequest, append: Append) -> bool:
    """Whether ``request``'s range fields include ``append`` (no range: everything)."""
    body = request.body
    if body.get("uidValidityChanged") is True or "sinceUid" not in body:
        return True
    since = body["sinceUid"]
    return (
        isinstance(since, int)
        and body.get("uidValidity") == append.uidvalidity
        and since <= append.uid
    )


def scanned(request: ScanRequest) -> bool:
    """Whether the backend accepted this POST (answered 2xx)."""
    return request.status is not None and 200 <= request.status < 300


def covers(request: ScanRequest, append: Append) -> bool:
    """Whether ``request`` is a scan of ``append``'s mailbox (and folder) that started
    after it."""
    return (
        request.email == append.user
        and request.body.get("mailbox") == append.mailbox
        and scanned(request)
        and request.received_at > append.at
        and in_range(request, append)
    )


@attrs.frozen
class Expunge:
    """One message removed from a mailbox by the test (for the failure report)."""

    user: str
    uid: int
    at: float
    note: str = ""


class Ledger:
    """Records appends (user, time) and checks them against the backend's requests."""

    def __init__(self, server: ImapTestServer, backend: ScanBackend) -> None:
        self.server = server
        self.backend = backend
        self.appends: list[Append] = []
        self.expunges: list[Expunge] = []
        #: the stored message of each append (it keeps its identity when a UIDVALIDITY
        #: change renumbers the mailbox)
        self._messages: dict[Append, Message] = {}

    def append(self, user: str, note: str = "", mailbox: str = "INBOX") -> Append:
        """Append a small message to ``user``'s mailbox now and remember when."""
        n = next(_numbers)
        uid = self.server.append(
            user,
            f"Subject: reliability #{n}\r\nFrom: t@x.test\r\n\r\nbody {n}\r\n".encode(),
            mailbox,
        )
        uidvalidity = self.server.mailbox(user, mailbox).uidvalidity
        record = Append(user, uid, trio.current_time(), note, uidvalidity, mailbox)
        self.appends.append(record)
        message = self.server.mailbox(user, mailbox).by_uid(uid)
        assert message is not None
        self._messages[record] = message
        return record

    def expunge_handled(self, user: str, note: str = "", mailbox: str = "INBOX") -> int | None:
        """Expunge the oldest message of ``user``'s mailbox that needs no scan any more
        (mail the ledger did not append, or an append already covered) and remember it;
        its UID, or None if every message still waits for a scan. Mail that is deleted
        while the daemon is away changes the count: only UIDs tell new mail then."""
        pending = {
            id(self._messages[a]) for a in self.uncovered(a for a in self.appends if a.user == user)
        }
        for message in self.server.mailbox(user, mailbox).messages:
            if id(message) not in pending:
                uid = message.uid
                self.server.expunge(user, uid, mailbox)
                self.expunges.append(Expunge(user, uid, trio.current_time(), note))
                return uid
        return None

    def uncovered(self, appends: Iterable[Append] | None = None) -> list[Append]:
        """The appends (all recorded ones by default) no accepted POST started after."""
        by_user: dict[str, list[ScanRequest]] = {}
        for request in self.backend.requests:
            if request.email is not None and scanned(request):
                by_user.setdefault(request.email, []).append(request)
        todo = self.appends if appends is None else list(appends)
        return [a for a in todo if not any(covers(r, a) for r in by_user.get(a.user, ()))]

    def delays(self) -> list[float]:
        """For each covered append: seconds until the first accepted POST after it."""
        by_user: dict[str, list[float]] = {}
        for request in self.backend.requests:
            if request.email is not None and scanned(request):
                by_user.setdefault(request.email, []).append(request.received_at)
        out = []
        for a in self.appends:
            later = [t for t in by_user.get(a.user, ()) if t > a.at]
            if later:
                out.append(min(later) - a.at)
        return out

    async def wait_covered(self, appends: Iterable[Append] | None = None) -> None:
        """Return once every append is covered. Never times out: bound it by the caller."""
        todo = self.appends if appends is None else list(appends)
        while self.uncovered(todo):
            finished = sum(1 for r in self.backend.requests if r.finished)
            await self.backend.wait_for_requests(finished + 1, finished=True)

    async def settle(
        self, within: float, appends: Iterable[Append] | None = None, *, context: str = ""
    ) -> None:
        """Wait up to ``within`` seconds for every append to be covered, then assert it
        (with a report naming each miss and the POSTs its mailbox got)."""
        todo = self.appends if appends is None else list(appends)
        with trio.move_on_after(within):
            await self.wait_covered(todo)
        self.check(todo, context=context)

    def check(self, appends: Iterable[Append] | None = None, *, context: str = "") -> None:
        """Assert the invariant now."""
        misses = self.uncovered(appends)
        assert not misses, self.report(misses, context)

    def report(self, misses: list[Append], context: str = "") -> str:
        now = trio.current_time()
        lines = [f"{len(misses)} append(s) never followed by an accepted scan POST. {context}"]
        for user in sorted({m.user for m in misses}):
            mine = [m for m in misses if m.user == user]
            lines.append(f"  {user}: missed uids {[(m.mailbox, m.uid) for m in mine]}")
            for m in mine[:5]:
                lines.append(f"    uid {m.uid} appended at t-{now - m.at:.3f}s {m.note}")
            for e in [e for e in self.expunges if e.user == user][-5:]:
                lines.append(f"    uid {e.uid} expunged at t-{now - e.at:.3f}s {e.note}")
            for r in self.backend.requests_for(user)[-8:]:
                lines.append(
                    f"    POST {r.body.get('mailbox')} reason={r.reason} "
                    f"received t-{now - r.received_at:.3f}s "
                    f"status={r.status} uidValidity={r.body.get('uidValidity')} "
                    f"sinceUid={r.body.get('sinceUid')}"
                )
        return "\n".join(lines)
