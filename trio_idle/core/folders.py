"""The folders a mailbox's session watches (``TRIO_IDLE_FOLDERS``): names and special uses.

A folder is named as the server names it (``INBOX``, ``Archive/2024``) or by its special
use (RFC 6154: ``\\Junk``, ``\\Sent``, ...), which the session resolves to the server's
folder once per connection (:mod:`trio_idle.imap.folders`). Pure.
"""

from __future__ import annotations

from typing import Final

#: the special uses RFC 6154 defines, in their canonical spelling
SPECIAL_USES: Final = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
_BY_LOWER: Final = {use.lower(): use for use in SPECIAL_USES}
#: how the folders beside the selected mailbox are watched (``TRIO_IDLE_FOLDER_WATCH``, a
#: row's ``imapFolderWatch``): ``status``: STATUS on the mailbox's own connection once per
#: tick; ``idle``: an IDLE connection of their own each (one more login per folder)
FOLDER_WATCH_STATUS: Final = "status"
FOLDER_WATCH_IDLE: Final = "idle"
FOLDER_WATCH_MODES: Final = (FOLDER_WATCH_STATUS, FOLDER_WATCH_IDLE)

#: a folder name longer than this is refused (servers limit names well below it)
MAX_FOLDER_CHARS: Final = 255


def is_special_use(folder: str) -> bool:
    """Whether ``folder`` names a special use (``\\Junk``) rather than a folder."""
    return folder.startswith("\\")


def parse_folders(text: str) -> tuple[str, ...]:
    """A comma-separated list of folders: names, or RFC 6154 special uses (``\\Junk``, any
    case, given back canonical). ``INBOX`` is given back upper case (its name is case-
    insensitive, RFC 3501 5.1). Blanks around each entry are ignored; an empty entry,
    an unknown special use, a control character, or a folder listed twice is refused."""
    folders: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty folder name in {text.strip()!r}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in item) or '"' in item:
            raise ValueError(f"folder {item!r} holds a control character or a quote")
        if len(item) > MAX_FOLDER_CHARS:
            raise ValueError(f"folder name longer than {MAX_FOLDER_CHARS} characters")
        if is_special_use(item):
            use = _BY_LOWER.get(item.lower())
            if use is None:
                raise ValueError(
                    f"unknown special-use folder {item!r}; expected one of "
                    f"{', '.join(SPECIAL_USES)}"
                )
            item = use
        elif item.upper() == "INBOX":
            item = "INBOX"
        if item in folders:
            raise ValueError(f"folder {item!r} listed twice")
        folders.append(item)
    return tuple(folders)
