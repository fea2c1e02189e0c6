"""SASL for OAuth2 sign-in: XOAUTH2 and OAUTHBEARER (RFC 7628), as pure functions.

The IMAP client (:meth:`trio_idle.imap.client.ImapConnection.authenticate_oauth2`)
drives the exchange; what is sent and how a server's answer is read lives here, tested
with plain values:

- :func:`choose_mechanism`: ``OAUTHBEARER`` where the server offers it (the standard),
  else ``XOAUTH2`` (Google's and Microsoft's original, offered by both);
- :func:`initial_response`: the base64 client response carrying the token;
- :func:`error_status`: the ``status`` of the JSON a server sends as a continuation
  when it refuses a token (Gmail: ``{"status":"401","schemes":"Bearer","scope":...}``),
  after which the client must answer (:func:`error_ack`) to get the tagged ``NO``.

Nothing here logs; the initial response contains the token and is a secret.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Final

OAUTHBEARER: Final = "OAUTHBEARER"
XOAUTH2: Final = "XOAUTH2"
MECHANISMS: Final = (OAUTHBEARER, XOAUTH2)
#: the most of a server's error status we keep (it goes into logs and health reports)
MAX_STATUS_CHARS: Final = 40


def choose_mechanism(capabilities: Iterable[str]) -> str:
    """``OAUTHBEARER`` if ``AUTH=OAUTHBEARER`` is among ``capabilities``, else ``XOAUTH2``
    (tried also when not advertised: some servers announce mechanisms only after TLS)."""
    upper = {c.upper() for c in capabilities}
    return OAUTHBEARER if f"AUTH={OAUTHBEARER}" in upper else XOAUTH2


def _saslname(user: str) -> str:
    # RFC 5801 section 4: ',' and '=' are escaped in the GS2 authzid
    return user.replace("=", "=3D").replace(",", "=2C")


def initial_response(mechanism: str, user: str, token: str, host: str, port: int) -> str:
    """The base64 client response for ``mechanism`` (a secret: it holds ``token``).

    Raises ``ValueError`` for an unknown mechanism, or a user or token containing the
    ``\\x01`` separator or a line break (they would change the message's meaning).
    """
    for value in (user, token):
        if any(ch in value for ch in "\x01\r\n\0"):
            raise ValueError("user or token contains a control character SASL cannot carry")
    if mechanism == OAUTHBEARER:
        text = (
            f"n,a={_saslname(user)},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
        )
    elif mechanism == XOAUTH2:
        text = f"user={user}\x01auth=Bearer {token}\x01\x01"
    else:
        raise ValueError(f"unknown SASL mechanism {mechanism!r}")
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def error_ack(mechanism: str) -> bytes:
    """What the client sends after an error challenge so the server ends the exchange:
    RFC 7628 asks OAUTHBEARER clients for a lone ``%x01`` (base64 ``AQ==``), XOAUTH2
    (Google's document) for an empty response."""
    return b"AQ==" if mechanism == OAUTHBEARER else b""


def challenge_text(line: bytes) -> bytes:
    """The base64 part of a continuation line ``+ <base64>`` (``b""`` if none)."""
    text = line[1:] if line.startswith(b"+") else line
    return text.strip()


def error_status(challenge: bytes) -> str | None:
    """The ``status`` a server's error challenge reports, or ``None`` if it is not the
    base64 JSON object RFC 7628 describes. The result is printable ASCII and short."""
    try:
        data = json.loads(base64.b64decode(challenge_text(challenge), validate=True))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    status = data.get("status")
    if isinstance(status, bool) or not isinstance(status, str | int):
        return None
    text = "".join(ch for ch in str(status) if ch.isascii() and ch.isprintable())
    return text[:MAX_STATUS_CHARS] or None
