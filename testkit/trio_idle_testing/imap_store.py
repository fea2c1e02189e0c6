"""In-memory mail store of the test server: users, mailboxes, messages (no I/O).

Guarantees: UIDs in a mailbox are strictly ascending and never reused until UIDVALIDITY
changes; ``uidnext`` is always greater than every UID present; every change bumps
``Mailbox.version`` and calls the mailbox's change callback (used to wake IDLE clients).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs

from .imap_faults import Faults

SYSTEM_FLAGS = frozenset({"\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"})


@attrs.define(eq=False)
class Message:
    """One stored message. ``internaldate`` is a UNIX timestamp."""

    uid: int
    data: bytes
    flags: set[str] = attrs.field(factory=set)
    internaldate: float = 0.0


@attrs.define(eq=False)
class Mailbox:
    """A mailbox: UIDVALIDITY, UIDNEXT and the messages in UID order."""

    name: str
    uidvalidity: int
    uidnext: int = 1
    messages: list[Message] = attrs.field(factory=list)
    #: Bumped on every change; a session compares it to what it last reported.
    version: int = 0
    #: RFC 6154 special-use attributes LIST shows (``\\Junk``)
    special_use: tuple[str, ...] = ()
    _snapshot: tuple[int, ...] | None = attrs.field(default=None, repr=False, alias="_snapshot")
    _on_change: Callable[[Mailbox], None] | None = attrs.field(
        default=None, repr=False, alias="_on_change"
    )

    @property
    def exists(self) -> int:
        """Number of messages (what ``* N EXISTS`` reports)."""
        return len(self.messages)

    @property
    def unseen(self) -> int:
        """Number of messages without ``\\Seen``."""
        return sum(1 for m in self.messages if "\\Seen" not in m.flags)

    def uids(self) -> tuple[int, ...]:
        """UIDs in order; the same tuple object is returned until the next change."""
        if self._snapshot is None:
            self._snapshot = tuple(m.uid for m in self.messages)
        return self._snapshot

    def append(self, data: bytes, flags: Iterable[str] = (), internaldate: float = 0.0) -> int:
        """Store a message; return its UID."""
        uid = self.uidnext
        self.uidnext += 1
        self.messages.append(Message(uid, bytes(data), set(flags), internaldate))
        self.changed()
        return uid

    def expunge_uids(self, uids: Iterable[int]) -> list[int]:
        """Remove the messages with these UIDs; return the UIDs actually removed."""
        wanted = set(uids)
        removed = [m.uid for m in self.messages if m.uid in wanted]
        if removed:
            self.messages = [m for m in self.messages if m.uid not in wanted]
            self.changed()
        return removed

    def expunge_deleted(self) -> list[int]:
        """Remove the messages flagged ``\\Deleted``; return their UIDs."""
        return self.expunge_uids(m.uid for m in self.messages if "\\Deleted" in m.flags)

    def renumber(self, uidvalidity: int) -> None:
        """Set a new UIDVALIDITY and renumber the messages 1..n (as after a server rebuild)."""
        self.uidvalidity = uidvalidity
        for number, message in enumerate(self.messages, start=1):
            message.uid = number
        self.uidnext = len(self.messages) + 1
        self.changed()

    def changed(self) -> None:
        """Record a change (flags, UIDs, messages) and notify the callback."""
        self.version += 1
        self._snapshot = None
        if self._on_change is not None:
            self._on_change(self)

    def by_uid(self, uid: int) -> Message | None:
        """The message with this UID, if present."""
        for message in self.messages:
            if message.uid == uid:
                return message
        return None


@attrs.define(eq=False)
class User:
    """An account: password, mailboxes (``INBOX`` matched case-insensitively), faults."""

    name: str
    password: str
    faults: Faults = attrs.field(factory=Faults)
    mailboxes: dict[str, Mailbox] = attrs.field(factory=dict)

    def find_mailbox(self, name: str) -> Mailbox | None:
        """Look a mailbox up by name (``inbox`` in any case means ``INBOX``)."""
        if name.upper() == "INBOX":
            name = "INBOX"
        return self.mailboxes.get(name)
