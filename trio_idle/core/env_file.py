"""The environment file (``/etc/trio-idle/env``), read exactly as systemd reads an
``EnvironmentFile=``, so one file means the same under systemd, ``trio-idle --env-file``
(PM2, Docker, a shell) and nowhere is a value expanded or mangled.

The rules are systemd.exec(5)'s ("EnvironmentFile="), implemented as systemd's own
state machine (``parse_env_file_internal`` in ``src/basic/env-file.c``) does:

* assignments ``KEY=VALUE`` separated by newlines (LF or CR); whitespace (space, tab)
  before the key, around ``=`` and after the value is dropped; interior whitespace of
  an unquoted value is kept verbatim;
* a line whose first non-blank character is ``#`` or ``;`` is a comment; a ``#``
  elsewhere is part of the value (``A=x # y`` is ``x # y``);
* lines without ``=`` are ignored;
* unquoted: ``\\`` keeps the next character (``\\\\`` → ``\\``); a backslash at the end
  of a line joins the next line (the newline dropped);
* ``'...'``: everything verbatim up to the next ``'`` (no escapes), newlines included;
* ``"..."``: ``\\"``, ``\\\\``, ``\\``` and ``\\$`` give the character, backslash-newline
  joins lines, a backslash before anything else is kept with it; newlines kept;
* quotes only open at the start of a value; quoted and unquoted parts that follow
  each other are joined (``A="x"'y'z`` is ``xyz``);
* ``$`` and backticks are never expanded (unlike ``. /etc/trio-idle/env`` in a shell);
* a key that is not a valid variable name (``export A``, ``A B``, ``1A``) is ignored, as
  systemd ignores it ("Ignoring invalid environment assignment"); the last assignment of
  a key wins; the file must be UTF-8 (systemd refuses to load it otherwise).

Pure: bytes in, a mapping out; :func:`read_env_file` is the only I/O.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import attrs

_NEWLINE: Final = "\n\r"
_WHITESPACE: Final = " \t\n\r"
_COMMENTS: Final = "#;"
#: what a backslash unescapes inside double quotes (POSIX shell)
_SHELL_NEED_ESCAPE: Final = '"\\`$'
#: systemd's env_name_is_valid: letters, digits, underscore, not starting with a digit
_VALID_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvFileError(ValueError):
    """The file cannot be used (unreadable, not UTF-8, a NUL byte); the message names
    the file and never quotes a value."""


@attrs.frozen
class EnvFile:
    """What a file assigns (``values``, the last assignment of a key wins), the keys
    systemd would ignore as invalid names (``ignored``, in order, for a warning), and the
    lines of comments ending in a backslash (``ambiguous_comments``): systemd before 254
    continues such a comment onto the next line, 254 and later do not (as we do)."""

    values: dict[str, str]
    ignored: tuple[str, ...] = ()
    ambiguous_comments: tuple[int, ...] = ()


def parse_env_file(data: bytes, name: str = "environment file") -> EnvFile:
    """Parse an environment file's bytes with systemd's rules (module docstring).

    Raises :class:`EnvFileError` for bytes systemd refuses (invalid UTF-8; a NUL byte,
    where systemd would silently stop reading)."""
    if b"\0" in data:
        raise EnvFileError(
            f"{name}: contains a NUL byte (line {data[: data.index(0)].count(10) + 1})"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EnvFileError(f"{name}: line {line} is not valid UTF-8") from None
    pairs = _assignments(text)
    ambiguous = tuple(
        number
        for number, line in enumerate(text.splitlines(), 1)
        if line.lstrip(" \t")[:1] in ("#", ";") and line.rstrip("\r").endswith("\\")
    )
    values: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in pairs:
        if _VALID_NAME.fullmatch(key):
            values.pop(key, None)  # keep the order of the last assignment
            values[key] = value
        else:
            ignored.append(key)
    return EnvFile(values, tuple(ignored), ambiguous)


#: an ignored key shown in a warning: words that are each a variable name (``export A``,
#: ``A B``), short; anything else may be a wrapped value's continuation line
_SHOWN_KEY: Final = re.compile(r"[A-Za-z0-9_]{1,64}(?:[ \t]+[A-Za-z0-9_]{1,64}){0,3}")


def shown_key(key: str) -> str:
    """How a warning names an ignored key (pure): quoted when it reads as a mistaken name
    (``'export A'``, ``'A B'``, ``'1A'``), else a description without its text — a line of a
    value wrapped in two (a pasted key or token holding ``=``) reads as such a key, and it
    may be half of a secret."""
    if len(key) <= 100 and _SHOWN_KEY.fullmatch(key):
        return repr(key)
    return "a line whose text before '=' (not shown: it may be part of a value)"


def read_env_file(path: str | Path) -> EnvFile:
    """Read and parse ``path`` (:func:`parse_env_file`); :class:`EnvFileError` if it
    cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EnvFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_env_file(data, str(path))


def _assignments(text: str) -> list[tuple[str, str]]:
    """systemd's state machine over the characters: (key, value) in file order."""
    out: list[tuple[str, str]] = []
    state = "pre_key"
    key: list[str] = []
    value: list[str] = []
    # where trailing whitespace of the key / of an unquoted value starts (None: none)
    key_ws: int | None = None
    value_ws: int | None = None

    def push(strip_value: bool) -> None:
        k = "".join(key[:key_ws] if key_ws is not None else key)
        v = value[:value_ws] if strip_value and value_ws is not None else value
        out.append((k, "".join(v)))

    for c in text:
        if state == "pre_key":
            if c in _COMMENTS:
                state = "comment"
            elif c not in _WHITESPACE:
                state, key, key_ws = "key", [c], None
        elif state == "key":
            if c in _NEWLINE:
                state, key = "pre_key", []
            elif c == "=":
                state, value, value_ws = "pre_value", [], None
            else:
                key_ws = _append(key, c, key_ws)
        elif state == "pre_value":
            if c in _NEWLINE:
                push(strip_value=False)
                state, key = "pre_key", []
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "value_escape"
            elif c not in _WHITESPACE:
                state = "value"
                value.append(c)
        elif state == "value":
            if c in _NEWLINE:
                push(strip_value=True)
                state, key = "pre_key", []
            elif c == "\\":
                state, value_ws = "value_escape", None
            else:
                value_ws = _append(value, c, value_ws)
        elif state == "value_escape":
            state = "value"
            if c not in _NEWLINE:  # an escaped newline joins the lines
                value.append(c)
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value.append(c)
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value.append(c)
        elif state == "double_escape":
            state = "double"
            if c in _SHELL_NEED_ESCAPE:
                value.append(c)
            elif c != "\n":
                value += ["\\", c]
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c in _NEWLINE:
                state = "pre_key"
        elif state == "comment_escape":
            # systemd ≥ 254: a comment's trailing backslash does not continue it
            state = "pre_key" if c in _NEWLINE else "comment"
    if state in ("pre_value", "value", "value_escape", "single", "double", "double_escape"):
        push(strip_value=state == "value")
    return out


def _append(chars: list[str], c: str, blanks_from: int | None) -> int | None:
    """Append ``c`` to an unquoted key or value; returns where its trailing whitespace
    now starts (``blanks_from`` before ``c``; ``None``: it ends in no whitespace)."""
    if c not in _WHITESPACE:
        blanks_from = None
    elif blanks_from is None:
        blanks_from = len(chars)
    chars.append(c)
    return blanks_from
