"""Writing one value into one ``[[connection]]`` entry of the connections file
(:mod:`trio_idle.accounts.source_file`), for ``trio-idle oauth authorize --entry``.

The file is the operator's: comments, order, spacing and quoting are theirs. So the edit
is textual and small — the one line of the key is replaced (its leading text and a trailing
comment kept), or, when the entry has no such key, one line is added after the entry's
last line of content — and every other byte stays as it was. It is then proven: the edited
text is parsed again and must mean exactly what the old text meant with that one value
set; a layout the line edit cannot handle (an inline ``connection = [...]`` array, a
multi-line string in the key, a quoted key) is refused with a message, never guessed at.

:func:`set_entry_string` is pure (bytes in, bytes out). :func:`replace_file` writes the
result atomically: a temporary file in the same directory with the old file's mode (and
owner, where allowed), flushed to disk, then renamed over it — unless the file changed
since it was read, which is refused. A reader (the daemon's refresh) sees the old file or
the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import tomllib
from typing import Any, Final

import attrs


class EntryEditError(ValueError):
    """The value cannot be written into the file safely; the message says why."""


_CONNECTION_HEADER: Final = re.compile(r"[ \t]*\[\[[ \t]*connection[ \t]*\]\][ \t]*(#.*)?")
_ANY_HEADER: Final = re.compile(r"[ \t]*\[")


@attrs.frozen
class Entry:
    """The entry found: its table as parsed, and the lines [start, end) it spans
    (header included)."""

    table: dict[str, Any]
    start: int
    end: int


def _parse(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EntryEditError(f"is not valid TOML: {exc}") from None


def _lines(data: bytes) -> tuple[str, list[str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EntryEditError("is not UTF-8") from None
    return text, text.splitlines(keepends=True)


def find_entry(data: bytes, entry_id: str) -> Entry:
    """The ``[[connection]]`` entry whose ``id`` is ``entry_id``. Raises
    :class:`EntryEditError` if there is none, more than one, or the file's layout is not
    one ``[[connection]]`` header per entry."""
    text, lines = _lines(data)
    entries = _parse(text).get("connection", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise EntryEditError("has no [[connection]] entries")
    found = [n for n, entry in enumerate(entries) if entry.get("id") == entry_id]
    if not found:
        raise EntryEditError(f"has no [[connection]] entry with id = {json.dumps(entry_id)}")
    if len(found) > 1:
        raise EntryEditError(f"has {len(found)} entries with id = {json.dumps(entry_id)}")
    headers = [
        n for n, line in enumerate(lines) if _CONNECTION_HEADER.fullmatch(line.rstrip("\r\n"))
    ]
    if len(headers) != len(entries):
        raise EntryEditError(
            "does not write each connection as its own [[connection]] table; add the line by hand"
        )
    start = headers[found[0]]
    end = next((n for n in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[n])), len(lines))
    return Entry(entries[found[0]], start, end)


def _eol(lines: list[str]) -> str:
    return "\r\n" if lines and lines[0].endswith("\r\n") else "\n"


def set_entry_string(data: bytes, entry_id: str, key: str, value: str) -> bytes:
    """``data`` with ``key = "<value>"`` in the entry ``entry_id``: the key's line
    replaced, or one line added after the entry's last line of content. Every other byte
    is kept. Pure; raises :class:`EntryEditError` (see the module docstring)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise ValueError("key must be a bare TOML key")
    entry = find_entry(data, entry_id)
    text, lines = _lines(data)
    # a TOML basic string: JSON's escapes (\" \\ \n \uXXXX ...) are TOML's too
    quoted = json.dumps(value, ensure_ascii=True)
    key_line = re.compile(
        rf"(?P<lead>[ \t]*{re.escape(key)}[ \t]*=[ \t]*)"
        r"(?P<value>\"(?:[^\"\\\r\n]|\\.)*\"|'[^'\r\n]*')"
        r"(?P<rest>[ \t]*(?:#[^\r\n]*)?)(?P<eol>\r?\n?)"
    )
    mentions = [
        n
        for n in range(entry.start + 1, entry.end)
        if re.match(rf"[ \t]*[\"']?{re.escape(key)}[\"']?[ \t]*=", lines[n])
    ]
    edited = list(lines)
    if len(mentions) > 1:
        raise EntryEditError(f"entry {json.dumps(entry_id)} sets {key} more than once")
    if mentions:
        match = key_line.fullmatch(lines[mentions[0]])
        if match is None:
            raise EntryEditError(
                f"entry {json.dumps(entry_id)}: its {key} line has a form this command "
                "does not rewrite (quoted key or multi-line string); edit it by hand"
            )
        edited[mentions[0]] = f"{match['lead']}{quoted}{match['rest']}{match['eol']}"
    else:
        content = [
            n
            for n in range(entry.start, entry.end)
            if lines[n].strip() and not lines[n].lstrip().startswith("#")
        ]
        last = content[-1]
        first_key = next((lines[n] for n in content if n != entry.start), "")
        indent = first_key[: len(first_key) - len(first_key.lstrip(" \t"))]
        eol = _eol(lines)
        if not edited[last].endswith(("\n", "\r")):
            edited[last] += eol  # the file ended without a newline on this line
        edited.insert(last + 1, f"{indent}{key} = {quoted}{eol}")
    new_text = "".join(edited)
    expected = _parse(text)
    expected["connection"][_index(expected, entry_id)][key] = value
    if _parse(new_text) != expected:
        raise EntryEditError(
            f"entry {json.dumps(entry_id)}: the file's layout defeats a safe one-line edit; "
            f"add {key} by hand"
        )
    return new_text.encode("utf-8")


def _index(parsed: dict[str, Any], entry_id: str) -> int:
    return next(n for n, e in enumerate(parsed["connection"]) if e.get("id") == entry_id)


def replace_file(path: str, old: bytes, new: bytes) -> None:
    """Put ``new`` in place of the file at ``path`` atomically, if it still holds ``old``.

    The file a symlink points to is replaced (the link stays). The new file gets the old
    one's permission bits and, where the process may set them, its owner and group; it is
    fsynced before the rename and the directory after. Raises :class:`EntryEditError`
    when the content changed meanwhile, ``OSError`` for the file system's refusals; the
    temporary file never stays behind.
    """
    real = os.path.realpath(path)
    directory, name = os.path.split(real)
    info = os.stat(real)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(new)
            handle.flush()
            os.fchmod(handle.fileno(), stat.S_IMODE(info.st_mode))
            if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
                # root editing the service user's file must not take it away from it;
                # anyone else cannot give it away and keeps it (the daemon may be them)
                with contextlib.suppress(PermissionError):
                    os.fchown(handle.fileno(), info.st_uid, info.st_gid)
            os.fsync(handle.fileno())
        with open(real, "rb") as current:
            if current.read() != old:
                raise EntryEditError("changed while this command ran; run it again")
        os.replace(temporary, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
