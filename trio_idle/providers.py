"""Provider presets — a STUB until helper L's table lands (the lead merges L's module).

Only the two functions account health codes against, with a generic preset that knows
no provider texts: :func:`classify_server_text` then always answers ``None`` and the
classifier falls back to the RFC 5530 response codes.
"""

from __future__ import annotations

from typing import Final

import attrs


@attrs.frozen
class Preset:
    """One provider's facts; the stub has only what account health reads."""

    key: str
    #: how hints name the provider ("enable IMAP in the GMX settings")
    name: str


GENERIC: Final = Preset("generic", "provider's")


def preset_for(email: str, host: str) -> Preset:
    """The preset for this mailbox (by email domain or host); the stub: always generic."""
    return GENERIC


def classify_server_text(preset: Preset, text: str) -> str | None:
    """The health reason the provider's ``text`` means, or ``None`` if not known."""
    return None
