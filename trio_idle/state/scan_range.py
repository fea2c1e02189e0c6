"""What a scan request tells the backend about *which* mail is new (pure).

Per mailbox the daemon keeps an accepted mark (:class:`ScanMark`): in its UIDVALIDITY,
every message with a UID below ``uidnext`` was covered by a scan the backend answered
2xx for (or was already in the mailbox when the daemon first watched it and decided
nothing needed scanning). A scan request carries the mark as ``sinceUid``
(:func:`scan_range`): ``UID SEARCH UID <sinceUid>:*`` finds exactly the mail the backend
has not accepted yet. The mark only moves after a 2xx (:func:`advance`), never
backwards within one UIDVALIDITY, so a failed or refused scan keeps its range and the
next (coalesced) scan carries the lowest ``sinceUid`` not yet accepted: nothing is
skipped. A mark from another UIDVALIDITY (or none) gives no ``sinceUid``: the backend
scans everything, as it did before ranges existed.

The mark is persisted as the state store's "scanned up to"
(:class:`~trio_idle.state.records.ScannedState`), so the range is right across restarts.
"""

from __future__ import annotations

from typing import Any

import attrs

from trio_idle.imap.responses import MailboxState


@attrs.frozen
class ScanMark:
    """Every message of ``uidvalidity`` with a UID below ``uidnext`` was accepted."""

    uidvalidity: int | None
    uidnext: int | None

    @classmethod
    def of(cls, state: MailboxState) -> ScanMark:
        return cls(state.uidvalidity, state.uidnext)


@attrs.frozen
class ScanRange:
    """The range fields of one scan request; all ``None``/False: say nothing."""

    #: the mailbox's UIDVALIDITY the range is in
    uid_validity: int | None = None
    #: every message with UID >= this arrived after the last accepted scan
    since_uid: int | None = None
    #: the UIDVALIDITY is not the accepted mark's: every UID known before is void
    uid_validity_changed: bool = False

    def fields(self) -> dict[str, Any]:
        """The optional body fields (``uidValidity``, ``sinceUid``, ``uidValidityChanged``)."""
        out: dict[str, Any] = {}
        if self.uid_validity is not None:
            out["uidValidity"] = self.uid_validity
        if self.since_uid is not None:
            out["sinceUid"] = self.since_uid
        if self.uid_validity_changed:
            out["uidValidityChanged"] = True
        return out


NO_RANGE = ScanRange()


def scan_range(mark: ScanMark | None, current: MailboxState | None) -> ScanRange:
    """The range a scan of ``current`` carries, given the accepted ``mark``.

    No UIDVALIDITY from the server: nothing. No mark (mailbox new to the daemon and its
    store) or a mark without UIDNEXT: the UIDVALIDITY only (scan everything). A mark
    from another UIDVALIDITY: ``uidValidityChanged`` (scan everything). Otherwise
    ``sinceUid`` is the mark's UIDNEXT.
    """
    if current is None or current.uidvalidity is None:
        return NO_RANGE
    if mark is None or mark.uidvalidity is None:
        return ScanRange(current.uidvalidity)
    if mark.uidvalidity != current.uidvalidity:
        return ScanRange(current.uidvalidity, uid_validity_changed=True)
    if mark.uidnext is None:
        return ScanRange(current.uidvalidity)
    return ScanRange(current.uidvalidity, since_uid=mark.uidnext)


def advance(mark: ScanMark | None, covered: MailboxState) -> ScanMark:
    """The mark after the backend accepted (2xx) a scan that started with ``covered``.

    Never backwards within one UIDVALIDITY (an older scan's success after a newer one,
    or a lower bound of UIDNEXT, must not re-open what was accepted)."""
    if (
        mark is not None
        and mark.uidvalidity == covered.uidvalidity
        and mark.uidnext is not None
        and (covered.uidnext is None or covered.uidnext < mark.uidnext)
    ):
        return mark
    return ScanMark.of(covered)


def on_connect(mark: ScanMark | None, selected: MailboxState, *, scanning: bool) -> ScanMark | None:
    """The mark once a session has SELECTed ``selected``; ``scanning``: a catch-up scan
    was requested (it carries the mark as it is, so mail that arrived while nobody
    listened is in its range).

    Without a catch-up scan, what the mailbox holds now counts as handled (the daemon
    decided so), so a missing mark starts at the server's UIDNEXT. A mark above the
    server's UIDNEXT in the same UIDVALIDITY (a server that went back) is lowered to
    it: new mail gets UIDs from there, and a range above them would skip it.
    """
    if mark is None:
        return None if scanning else ScanMark.of(selected)
    if (
        mark.uidvalidity == selected.uidvalidity
        and mark.uidnext is not None
        and selected.uidnext is not None
        and selected.uidnext < mark.uidnext
    ):
        return ScanMark(mark.uidvalidity, selected.uidnext)
    return mark
