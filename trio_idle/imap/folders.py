"""Which server folder each watched folder is: LIST answers and special uses (pure).

A session resolves its folders (:func:`trio_idle.core.folders.parse_folders`) once per
connection from one ``LIST`` answer — ``LIST "" "*" RETURN (SPECIAL-USE)`` where the
server announces ``LIST-EXTENDED``, plain ``LIST "" "*"`` elsewhere (servers announcing
``SPECIAL-USE``, and Gmail, mark ``\\Junk`` there). A special use (``\\Junk``) becomes
the folder carrying that attribute; a server that marks none falls back to the names
providers use (:data:`FALLBACK_NAMES`) among the folders listed; a named folder must be
listed. What cannot be resolved is *missing*: reported once, never retried in a loop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import attrs

from trio_idle.core.folders import is_special_use

#: names providers give their special-use folders, tried in order when no folder carries
#: the attribute (Gmail, Dovecot/most, Outlook/Exchange, GMX/Yahoo, ...)
FALLBACK_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "\\Junk": (
        "[Gmail]/Spam",
        "Junk",
        "Junk-E-Mail",
        "Junk E-mail",
        "Spam",
        "INBOX.Junk",
        "INBOX.Spam",
    ),
    "\\Sent": ("[Gmail]/Sent Mail", "Sent", "Sent Items", "Sent Messages", "INBOX.Sent"),
    "\\Trash": ("[Gmail]/Trash", "Trash", "Deleted Items", "Deleted Messages", "INBOX.Trash"),
    "\\Drafts": ("[Gmail]/Drafts", "Drafts", "INBOX.Drafts"),
    "\\Archive": ("Archive", "Archives", "INBOX.Archive"),
    "\\All": ("[Gmail]/All Mail",),
    "\\Flagged": ("[Gmail]/Starred",),
}

# * LIST (\HasNoChildren \Junk) "/" "Junk"   (the name quoted, atom, or NIL delimiter)
_LIST_RE = re.compile(
    rb'^(?:\*\s+)?LIST\s+\(([^)]*)\)\s+(NIL|"(?:[^"\\]|\\.)*")\s+(.+?)\s*$', re.IGNORECASE
)


@attrs.frozen
class ListEntry:
    """One folder of a LIST answer: its name (modified UTF-7 as the server sent it, quotes
    and escapes removed), attributes (as sent, e.g. ``\\Junk``), hierarchy delimiter."""

    name: str
    attributes: frozenset[str]
    delimiter: str | None

    def has(self, attribute: str) -> bool:
        return attribute.lower() in {a.lower() for a in self.attributes}

    @property
    def selectable(self) -> bool:
        return not (self.has("\\Noselect") or self.has("\\NonExistent"))


def _unquote(raw: bytes) -> str | None:
    if raw.startswith(b'"'):
        if len(raw) < 2 or not raw.endswith(b'"'):
            return None
        raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
    elif raw.startswith(b"{"):
        return None  # a literal name: not resolvable from this line alone
    return raw.decode("ascii", "replace")


def parse_list(lines: Iterable[bytes | bytearray]) -> tuple[ListEntry, ...]:
    """The folders of a LIST answer's untagged lines, in order; other lines (the tagged
    OK, EXISTS pushed meanwhile) and names sent as literals are skipped."""
    entries: list[ListEntry] = []
    for raw in lines:
        m = _LIST_RE.match(bytes(raw))
        if m is None:
            continue
        attrs_raw, delim_raw, name_raw = m.groups()
        # LIST-EXTENDED may append extended data after the name: "(CHILDINFO ...)"
        if name_raw.startswith(b'"'):
            end = re.match(rb'"(?:[^"\\]|\\.)*"', name_raw)
            if end is None:
                continue
            name_raw = end.group(0)
        else:
            name_raw = name_raw.split(b" ", 1)[0]
        name = _unquote(name_raw)
        if name is None:
            continue
        delimiter = None if delim_raw.upper() == b"NIL" else _unquote(delim_raw)
        attributes = frozenset(a.decode("ascii", "replace") for a in attrs_raw.split())
        entries.append(ListEntry(name, attributes, delimiter))
    return tuple(entries)


@attrs.frozen
class Resolution:
    """What the watched folders are on this server: ``found`` maps each wanted entry
    (``\\Junk``, ``Archive``) to the server's folder; ``missing`` the wanted entries it
    does not have. A folder two entries resolve to is watched once (the first)."""

    found: dict[str, str]
    missing: tuple[str, ...]

    @property
    def folders(self) -> tuple[str, ...]:
        """The server folders to watch, in the order wanted, each once."""
        return tuple(dict.fromkeys(self.found.values()))


def _is_inbox(name: str) -> bool:
    return name.upper() == "INBOX"


def resolve_folders(wanted: Iterable[str], entries: Iterable[ListEntry]) -> Resolution:
    """Each wanted folder (a name or a special use) as the server names it. Pure.

    A special use: the first selectable folder carrying the attribute, else the first
    of :data:`FALLBACK_NAMES` that is listed. A name: the listed folder of that name
    (INBOX in any case). Anything else is missing.
    """
    listed = [e for e in entries if e.selectable]
    names = {e.name: e for e in listed}
    found: dict[str, str] = {}
    missing: list[str] = []
    for want in wanted:
        server: str | None = None
        if is_special_use(want):
            server = next((e.name for e in listed if e.has(want)), None)
            if server is None:
                server = next((n for n in FALLBACK_NAMES.get(want, ()) if n in names), None)
        elif _is_inbox(want):
            server = "INBOX"  # always there (RFC 3501 5.1), listed or not
        elif want in names:
            server = want
        if server is None:
            missing.append(want)
        else:
            found[want] = "INBOX" if _is_inbox(server) else server
    return Resolution(found, tuple(missing))


#: a mailbox name that goes as is (RFC 3501 ``astring``: no space, control, quote,
#: backslash, parenthesis, brace or wildcard); anything else is sent quoted
_ASTRING_RE = re.compile(r'[^\x00-\x20\x7f-\uffff(){%*"\\]+')


def mailbox_arg(name: str) -> str:
    """``name`` as a command's mailbox argument: as is where it is an atom-like string
    (``INBOX``, ``[Gmail]/Spam``), else a quoted string (``"Junk E-mail"``, RFC 3501 9)."""
    if _ASTRING_RE.fullmatch(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def list_command_args(capabilities: Iterable[str]) -> tuple[str, ...]:
    """The LIST arguments for this server: every folder, with the special-use attributes
    asked for where LIST-EXTENDED allows it (RFC 5258/6154); plain LIST elsewhere, where
    servers announcing SPECIAL-USE (and Gmail) mark them anyway."""
    if "LIST-EXTENDED" in {c.upper() for c in capabilities}:
        return ('""', '"*"', "RETURN", "(SPECIAL-USE)")
    return ('""', '"*"')
