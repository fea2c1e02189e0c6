"""How a scan worker gets the envelopes of new mail from the session that owns the link.

Only the session task talks to its IMAP connection (IDLE, the tick, the renewal), so the
scan worker does not fetch itself: it leaves a request at the connection's
:class:`FetchDesk` (:meth:`FetchDesk.ask`), which interrupts the session's wait; the
session runs :meth:`~trio_idle.imap.connector.ImapLink.fetch_new` (DONE, UID SEARCH,
UID FETCH, IDLE) and hands the answer back. When no session is watching the mailbox
(connecting, backing off) or the fetch fails, the worker gets ``None`` and sends the
range without envelopes: a scan is never held up by the envelope fetch for longer than
its bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import attrs
import trio

from trio_idle.imap.envelope import NewMail


@attrs.define(eq=False)
class FetchRequest:
    since_uid: int
    limit: int
    taken: bool = False
    result: NewMail | None = None
    done: trio.Event = attrs.field(factory=trio.Event)


class FetchDesk:
    """One request at a time between a connection's scan worker and its session.
    Trio thread only; nothing here blocks but :meth:`ask`."""

    __slots__ = ("_listening", "_open", "_request")

    def __init__(self) -> None:
        self._open = False
        self._request: FetchRequest | None = None
        self._listening: trio.CancelScope | None = None

    # -- the scan worker's side ----------------------------------------------------------

    async def ask(self, since_uid: int, limit: int) -> NewMail | None:
        """The session's :meth:`~trio_idle.imap.connector.ImapLink.fetch_new` answer, or
        ``None``: no session watching now, or the fetch failed. The session's fetch is
        bounded by its command deadline; callers bound their wait with a cancel scope.
        Always a checkpoint; cancelled, the request is withdrawn (a fetch already under
        way finishes in the session and its answer is dropped)."""
        if not self._open or self._request is not None:
            await trio.lowlevel.checkpoint()
            return None
        request = FetchRequest(since_uid, limit)
        self._request = request
        if self._listening is not None:
            self._listening.cancel()
        try:
            await request.done.wait()
        finally:
            if self._request is request:
                self._request = None
        return request.result

    # -- the session's side --------------------------------------------------------------

    def open(self) -> None:
        """The session watches the mailbox (selected, idling or polling)."""
        self._open = True

    def close(self) -> None:
        """The session stopped watching: a waiting request is answered ``None``."""
        self._open = False
        if self._request is not None:
            self._request.done.set()
            self._request = None

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """While inside, a request cancels the block (at once if one is waiting)."""
        with trio.CancelScope() as scope:
            if self._request is not None and not self._request.taken:
                scope.cancel()
            self._listening = scope
            try:
                yield
            finally:
                self._listening = None

    def listen(self, scope: trio.CancelScope) -> None:
        """Until :meth:`unlisten`, a request cancels ``scope`` (at once if one is waiting).

        :meth:`listening` without its own scope and context manager, for the IDLE loop,
        which already has a scope (its tick deadline) and runs once per wake-up."""
        if self._request is not None and not self._request.taken:
            scope.cancel()
        self._listening = scope

    def unlisten(self) -> None:
        self._listening = None

    def take(self) -> FetchRequest | None:
        """The request to serve now, if one waits; the caller sets ``result`` (or leaves
        it ``None``) and then ``done``."""
        request = self._request
        if request is None or request.taken:
            return None
        request.taken = True
        return request
