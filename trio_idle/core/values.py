"""Setting values from text: durations, sizes, numbers, switches, choices, names, addresses.

Each parser turns what an operator wrote into a typed value or raises :class:`ValueError`
whose message is one line saying what was expected (the configuration prefixes the
variable's name). Parsers of secrets never echo the value. Everything here is pure.
URLs are parsed in :mod:`trio_idle.core.urls`, refused networks in
:mod:`trio_idle.core.destinations`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, TypeVar

from trio_idle.core.secret import Secret

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"120"``, ``"120s"``, ``"2m"``, ``"25min"``, ``"1.5h"``, ``"500ms"`` → seconds (> 0)."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"expected a positive duration like 120, 30s, 2m or 1h, got {text!r}")
    value = float(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "s").lower()]
    if value <= 0:
        raise ValueError(f"expected a positive duration, got {text!r}")
    return value


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([kmg])(i?b)?|(b))?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """``"1048576"``, ``"512k"``, ``"64KiB"``, ``"1M"``, ``"1MiB"``, ``"1G"`` → bytes (> 0).

    Units are binary whatever the spelling (``1MB`` is 1,048,576 bytes, as ``1MiB``):
    these are buffer bounds, not disk sizes. A plain number is bytes.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"expected a size like 1048576, 512k, 64KiB or 1MiB, got {text!r}")
    number, unit = int(match.group(1)), match.group(2)
    value = number * _SIZE_UNITS[unit.lower()] if unit else number
    if value <= 0:
        raise ValueError(f"expected a positive size, got {text!r}")
    return value


def parse_buffer_size(text: str) -> int:
    """A size (:func:`parse_size`) of at least 1KiB."""
    value = parse_size(text)
    if value < 1024:  # smaller would refuse ordinary greetings and SELECT answers
        raise ValueError(f"expected at least 1KiB, got {text!r}")
    return value


_N = TypeVar("_N", int, float)


def _number(text: str, kind: Callable[[str], _N], accept: Callable[[_N], bool], what: str) -> _N:
    """``text`` as a ``kind`` that ``accept`` takes, else :class:`ValueError` saying it
    expected ``what`` (NaN is refused: no comparison holds for it)."""
    try:
        value = kind(text.strip())
    except ValueError:
        raise ValueError(f"expected {what}, got {text!r}") from None
    if not accept(value):
        raise ValueError(f"expected {what}, got {text!r}")
    return value


def parse_positive_int(text: str) -> int:
    return _number(text, int, lambda value: value > 0, "a positive integer")


def parse_positive_float(text: str) -> float:
    return _number(text, float, lambda value: value > 0, "a positive number")


def parse_fraction(text: str) -> float:
    """A number from 0 to 1, both included."""
    return _number(text, float, lambda value: 0 <= value <= 1, "a number between 0 and 1")


def parse_share(text: str) -> float:
    """A number above 0 and at most 1 (a share that cannot be nothing)."""
    return _number(text, float, lambda value: 0 < value <= 1, "a number above 0 and at most 1")


_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


def parse_bool(text: str) -> bool:
    """``true``/``false``, ``1``/``0``, ``yes``/``no`` (any case) → bool."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected true or false (also 1/0, yes/no), got {text!r}")


def one_of(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    """A parser accepting one of ``options``, in any case (given back lower case, or
    upper case with ``upper``)."""

    def parse(text: str) -> str:
        value = text.strip().upper() if upper else text.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return value

    return parse


def parse_stripped(text: str) -> str:
    """Any text, surrounding blanks removed (empty is allowed)."""
    return text.strip()


def parse_nonempty(text: str) -> str:
    """Text that is not blank, surrounding blanks removed."""
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def parse_nonempty_secret(text: str) -> Secret:
    """A secret taken as written (blanks are part of it), refused when empty."""
    if not text:
        raise ValueError("must not be empty")
    return Secret(text)


def parse_listen_addr(text: str) -> tuple[str, int]:
    """``"9310"`` or ``":9310"`` → ``("127.0.0.1", 9310)``; ``"0.0.0.0:9310"``, ``"[::1]:9310"``.

    Port 0 asks the kernel for a free port (the bound address is logged).
    """
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    host = host.strip()
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected PORT or HOST:PORT (port 0-65535), got {text!r}")
    if ":" in host and not (bracketed and re.fullmatch(r"[0-9a-fA-F:.]+", host)):
        raise ValueError(f"expected PORT or HOST:PORT (an IPv6 host in brackets), got {text!r}")
    return (host or "127.0.0.1", int(port_text))


def parse_header_name(text: str) -> str:
    """An HTTP header name → lower case."""
    if not re.fullmatch(r"[A-Za-z0-9-]+", text):
        raise ValueError(f"expected an HTTP header name (letters, digits, '-'), got {text!r}")
    return text.lower()


_BEARER_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")


def parse_bearer_token(text: str) -> Secret:
    """A token for an ``Authorization: Bearer`` header (RFC 6750's characters)."""
    # Never echo the value, not even part of it: a near-miss is usually the real token.
    if not 16 <= len(text) <= 512:
        raise ValueError(f"expected 16 to 512 characters, got {len(text)} (value not shown)")
    if not _BEARER_TOKEN_RE.fullmatch(text):
        raise ValueError(
            "expected only the characters A-Z a-z 0-9 - . _ ~ + / and trailing = "
            "(e.g. openssl rand -hex 32; value not shown)"
        )
    return Secret(text)


_INSTANCE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


def parse_instance_id(text: str) -> str:
    """A process's name among its peers: 1 to 128 letters, digits or ``. _ : @ -``."""
    return _matching(
        text.strip(),
        _INSTANCE_ID,
        "1 to 128 letters, digits or . _ : @ - (starting with a letter or digit)",
    )


_IDENT = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")'
_TABLE = re.compile(rf"^{_IDENT}(?:\.{_IDENT})?$")


def parse_table_name(text: str) -> str:
    """A table name for SQL: ``name``, ``"Quoted"`` or ``schema.name`` (either part
    quoted or not); anything else (spaces, semicolons, ...) is refused."""
    return _matching(
        text, _TABLE, 'a table name such as "MailConnection" or public.mail_connection'
    )


def _matching(text: str, pattern: re.Pattern[str], what: str) -> str:
    """``text`` without surrounding blanks when ``pattern`` matches all of it, else
    :class:`ValueError` saying it expected ``what``."""
    value = text.strip()
    if not pattern.fullmatch(value):
        raise ValueError(f"expected {what}, got {text!r}")
    return value
