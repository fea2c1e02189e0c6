"""The one scrubber for text from outside: secrets masked, control characters escaped, cut.

Every piece of text that comes from a mail server, aioimaplib, asyncpg or httpx passes
through a :class:`Scrubber` before it reaches a log line, ``/status``, ``/metrics``, a CLI
table or an exception message that is shown. Such text is untrusted twice over: a server
can echo our own command line back (aioimaplib's ``Abort`` quotes the ``LOGIN`` line, with
the password), and it can contain CR/LF or terminal escapes that forge log lines.

Guarantees of :meth:`Scrubber.scrub`, in this order:

1. the arguments of credential-carrying commands (``LOGIN <user> <password>``,
   ``AUTHENTICATE <mechanism> <response>``, ``Bearer <token>``) and the user information
   of URLs (``https://user:password@host``) are masked whoever's they are, and every
   secret the scrubber was given is replaced by :data:`MASK`, in each form it can take on
   the way (raw, IMAP-quoted, Python ``repr`` of ``str`` and ``bytes``, JSON,
   URL-encoded with ``%20`` and with ``+``, base64) — by the boundary rule below;
2. control characters (C0, DEL, C1, Unicode line/paragraph separators, bidi and
   zero-width format characters) are escaped as ``\\xNN`` / ``\\uNNNN``, so the result is
   one printable line;
3. the result is cut to ``limit`` characters (an ellipsis marks the cut).

The boundary rule (what a masked text may tell its reader): a spelling of a secret at
least :data:`MIN_SUBSTRING` characters long is masked wherever it appears, even inside a
longer word (such a coincidence is too unlikely to matter). A shorter one is masked only
as a whole token: where it is not glued to a word character (letter, digit, underscore,
any script) on a side where it itself begins or ends with one. Masking a short secret
inside a longer word would *reveal* it: with the password ``WRONG``, OpenSSL's
``WRONG_VERSION_NUMBER`` would read ``********_VERSION_NUMBER``. A server that echoes the
secret quotes it as a token (``LOGIN user "WRONG"``, ``bad password WRONG.``,
``p=WRONG&``), and those are masked. What a whole-token rule cannot do is hide a short
password that is also an ordinary word of the text, nor one glued to other text:
passwords shorter than :data:`WEAK_BELOW` characters are flagged (:func:`weakly_masked`;
the daemon logs them once at start, ``check`` lists them).

Pure: no I/O, no global state; tested with plain strings.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from typing import Final, Protocol
from urllib.parse import quote, quote_plus, unquote, urlsplit, urlunsplit

MASK: Final = "********"
#: how long text from a server may be once scrubbed (the issue's "short")
DEFAULT_LIMIT: Final = 200
#: spellings of a secret at least this long are masked wherever they appear, even
#: inside a longer word; shorter ones only as a whole token (the boundary rule)
MIN_SUBSTRING: Final = 12
#: a password shorter than this is flagged as too short to mask safely
WEAK_BELOW: Final = 8

_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]"
)


_QUOTED_OR_ATOM = r'(?:"(?:[^"\\]|\\.)*"?|\{\d+\+?\}|[^\s"]+)'
#: commands whose last argument is a credential, as aioimaplib quotes them back to us
#: — as a tagged command line (``A1 LOGIN user pw``), so that our own words ("no answer
#: to LOGIN within 1s", "login rejected for") stay readable; case-sensitive, as our client
#: sends them
_TAG = r"(?<![\w.])[A-Za-z]{0,12}[0-9]+[A-Za-z0-9]*\s+"
_COMMAND_CREDENTIALS = re.compile(
    rf"({_TAG}LOGIN\s+{_QUOTED_OR_ATOM}\s+){_QUOTED_OR_ATOM}"
    rf"|({_TAG}AUTHENTICATE\s+[A-Za-z0-9_-]+\s+){_QUOTED_OR_ATOM}"
    r"|(\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}"
)


#: ``scheme://user:password@`` anywhere in a text (a library quoting a URL back)
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,30}://)[^/\s@\"'<>]+@")


def _mask_command(match: re.Match[str]) -> str:
    return (match.group(1) or match.group(2) or match.group(3)) + MASK


def mask_credentials(text: str) -> str:
    """Mask the credential argument of LOGIN / AUTHENTICATE / Bearer and the user
    information of URLs, whoever's they are."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    return _COMMAND_CREDENTIALS.sub(_mask_command, text)


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` as one printable line: control and format characters escaped."""
    return _CONTROL.sub(_escape_control, text)


def secret_forms(secret: str) -> set[str]:
    """Every spelling of ``secret`` that text on its way to us can contain."""
    forms = {
        secret,
        secret.replace("\\", "\\\\").replace('"', '\\"'),  # IMAP quoted string
        repr(secret)[1:-1],
        repr(secret.encode("utf-8", "surrogateescape"))[2:-1],
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        quote(secret, safe=""),
        quote_plus(secret, safe=""),
        base64.b64encode(secret.encode("utf-8", "surrogateescape")).decode().rstrip("="),
        escape_controls(secret),
    }
    forms.discard("")
    return forms


_WORD = re.compile(r"\w")


def _whole_token(form: str) -> str:
    """A pattern for ``form`` only where it is not glued to a word character on a side
    where it itself begins or ends with one (the boundary rule)."""
    before = r"(?<!\w)" if _WORD.match(form[0]) else ""
    after = r"(?!\w)" if _WORD.match(form[-1]) else ""
    return f"{before}{re.escape(form)}{after}"


def weakly_masked(secret: str) -> bool:
    """Whether ``secret`` is too short to mask safely: shorter than :data:`WEAK_BELOW`
    characters (likely an ordinary word of some server text, or glued to one)."""
    return 0 < len(secret) < WEAK_BELOW


class Scrubs(Protocol):
    """Anything that makes outside text safe to show: a :class:`Scrubber`, or a
    connection's :class:`~trio_idle.accounts.outcome_text.ConnectionSecrets`."""

    def scrub(self, text: object, limit: int | None = None) -> str: ...


class Scrubber:
    """Masks a fixed set of secrets in text; see the module docstring for the guarantees.

    Build one per process (the admin secret, the database password) or per request;
    a connection's secrets live in :class:`~trio_idle.accounts.outcome_text.ConnectionSecrets`,
    which builds one of these. Cheap to call: one compiled pattern, built on
    the first call (so an unused scrubber costs a tuple of references).
    """

    __slots__ = ("_limit", "_pattern", "_secrets")

    def __init__(self, secrets: Iterable[str | None] = (), *, limit: int = DEFAULT_LIMIT) -> None:
        self._limit = limit
        # The pattern is built on first use: a session keeps its scrubber for years and
        # most never scrub anything, and a compiled pattern per password is ~0.7 KiB.
        self._secrets: tuple[str, ...] | None = tuple(s for s in secrets if s)
        self._pattern: re.Pattern[str] | None = None

    def _compiled(self) -> re.Pattern[str] | None:
        if self._secrets is None:
            return self._pattern
        long_forms: set[str] = set()
        short_forms: set[str] = set()
        for secret in self._secrets:
            for form in secret_forms(secret):
                (long_forms if len(form) >= MIN_SUBSTRING else short_forms).add(form)
        # Longest first, so a form that contains another is masked whole.
        parts = [re.escape(f) for f in sorted(long_forms, key=len, reverse=True)]
        parts += [_whole_token(f) for f in sorted(short_forms, key=len, reverse=True)]
        self._pattern = re.compile("|".join(parts)) if parts else None
        self._secrets = None
        return self._pattern

    def mask(self, text: str) -> str:
        """Only step 1: secrets masked; length and characters left as they are."""
        text = mask_credentials(text)
        pattern = self._compiled()
        if pattern is None:
            return text
        return pattern.sub(MASK, text)

    def scrub(self, text: object, limit: int | None = None) -> str:
        """``text`` (anything: it is ``str()``-ed) made safe to show."""
        limit = self._limit if limit is None else limit
        raw = text if isinstance(text, str) else _to_text(text)
        # Bound the work on huge input before the regexes run; keep enough beyond the
        # limit that a secret straddling the cut is still seen whole and masked.
        raw = raw[: limit * 4 + 1024]
        cleaned = escape_controls(self.mask(raw))
        cleaned = self.mask(cleaned)  # a secret that itself held control characters
        if len(cleaned) > limit:
            cleaned = cleaned[: max(0, limit - 1)] + "…"
        return cleaned

    __call__ = scrub


def _to_text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    try:
        return str(value)
    except Exception as exc:  # a hostile __str__ must not end the caller
        return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"


#: for text that carries no secret of ours but still comes from outside
PLAIN: Final = Scrubber()


def redact_url(url: str) -> str:
    """``url`` without the password (and user) of its authority part: ``user:****@`` → ``****@``.

    Query strings are kept (they rarely carry credentials for our URLs; the ping URL,
    which embeds a token in its path, is never shown at all).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{MASK}@{host}"))


def url_secrets(url: str) -> list[str]:
    """What of ``url`` must never be shown: the whole URL and its password (raw and
    percent-decoded), for a :class:`Scrubber` of e.g. ``DATABASE_URL``."""
    found = [url]
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return found
    if password:
        found += [password, unquote(password)]
    return found
