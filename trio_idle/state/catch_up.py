"""The restart catch-up decision: did mail arrive in a mailbox while the daemon was down?

Pure: the stored :class:`~trio_idle.state.records.ScannedState` against the server's
:class:`~trio_idle.imap.responses.MailboxState` of the first SELECT in this process.
"""

from __future__ import annotations

from typing import Final

from trio_idle.imap.responses import CatchUp, MailboxState
from trio_idle.state.records import ScannedState

#: ``TRIO_IDLE_START_FROM=now``: the reason a mailbox new to the store is not scanned
STARTED_FROM_NOW: Final = "mailbox new to the state store; starting from now"


def startup_decision(
    stored: ScannedState | None, current: MailboxState, start_from: str = "full"
) -> CatchUp:
    """First session of a connection in this process: did mail arrive while we were down?

    Pure. New to the store → scan (we cannot know), unless ``start_from`` is ``"now"``
    (the mail there counts as handled: the caller stores the server's UIDNEXT instead);
    UIDVALIDITY changed → scan; the server's UIDNEXT above the one the last successful
    scan covered → scan; otherwise no. ``start_from`` only ever concerns a mailbox with no
    stored state.
    """
    if stored is None:
        if start_from == "now":
            return CatchUp(False, STARTED_FROM_NOW)
        return CatchUp(True, "mailbox new to the state store")
    if (
        stored.uidvalidity is not None
        and current.uidvalidity is not None
        and stored.uidvalidity != current.uidvalidity
    ):
        return CatchUp(True, "uidvalidity changed while down")
    if stored.uidnext is None or current.uidnext is None:
        return CatchUp(True, "no UIDNEXT to compare")
    if current.uidnext > stored.uidnext:
        return CatchUp(
            True, f"mail arrived while down (uidnext {stored.uidnext}→{current.uidnext})"
        )
    return CatchUp(False, "nothing new since the last scan")
