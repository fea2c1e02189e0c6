"""SASL messages for OAuth2 sign-in (pure functions of trio_idle.imap.sasl)."""

from __future__ import annotations

import base64
import json

import pytest

from trio_idle.imap.sasl import (
    OAUTHBEARER,
    XOAUTH2,
    choose_mechanism,
    error_ack,
    error_status,
    initial_response,
)


def decoded(response: str) -> bytes:
    return base64.b64decode(response, validate=True)


def test_oauthbearer_is_preferred_where_offered() -> None:
    assert choose_mechanism(["IMAP4rev1", "AUTH=XOAUTH2", "AUTH=OAUTHBEARER"]) == OAUTHBEARER
    assert choose_mechanism(["IMAP4rev1", "auth=oauthbearer"]) == OAUTHBEARER


def test_xoauth2_otherwise_even_when_not_advertised() -> None:
    assert choose_mechanism(["IMAP4rev1", "AUTH=XOAUTH2"]) == XOAUTH2
    assert choose_mechanism(["IMAP4rev1", "AUTH=PLAIN"]) == XOAUTH2


def test_xoauth2_response_is_googles_format() -> None:
    response = initial_response(XOAUTH2, "alice@example.test", "ya29.tok", "imap.x", 993)
    assert decoded(response) == b"user=alice@example.test\x01auth=Bearer ya29.tok\x01\x01"


def test_oauthbearer_response_follows_rfc7628() -> None:
    response = initial_response(OAUTHBEARER, "alice@example.test", "tok", "imap.example.test", 993)
    assert decoded(response) == (
        b"n,a=alice@example.test,\x01host=imap.example.test\x01port=993\x01auth=Bearer tok\x01\x01"
    )


def test_oauthbearer_escapes_the_authzid() -> None:
    response = initial_response(OAUTHBEARER, "a,b=c", "tok", "h", 1)
    assert decoded(response).startswith(b"n,a=a=2Cb=3Dc,\x01")


@pytest.mark.parametrize("user, token", [("a\x01b", "t"), ("a", "t\x01"), ("a", "t\r\n")])
def test_separators_in_user_or_token_are_refused(user: str, token: str) -> None:
    with pytest.raises(ValueError) as info:
        initial_response(XOAUTH2, user, token, "h", 1)
    assert token not in str(info.value) or token == "t"


def test_unknown_mechanism_is_refused() -> None:
    with pytest.raises(ValueError):
        initial_response("PLAIN", "a", "t", "h", 1)


def challenge(obj: object) -> bytes:
    return b"+ " + base64.b64encode(json.dumps(obj).encode())


def test_gmail_error_challenge_gives_its_status() -> None:
    line = challenge({"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"})
    assert error_status(line) == "401"


def test_dovecot_error_challenge_gives_its_status() -> None:
    line = challenge({"status": "invalid_token", "schemes": "bearer"})
    assert error_status(line) == "invalid_token"
    assert error_status(challenge({"status": 400})) == "400"


@pytest.mark.parametrize(
    "line",
    [b"+ ", b"+ not base64!", b"+ " + base64.b64encode(b"not json"), challenge(["401"]),
     challenge({"schemes": "Bearer"}), challenge({"status": True}), challenge({"status": ""})],
)  # fmt: skip
def test_other_challenges_give_no_status(line: bytes) -> None:
    assert error_status(line) is None


def test_hostile_status_is_printable_and_short() -> None:
    status = error_status(challenge({"status": "4\r\n01\x1b[31m" + "x" * 500}))
    assert status is not None and status.isprintable() and len(status) <= 40
    assert "\r" not in status and "\x1b" not in status


def test_error_acknowledgements() -> None:
    assert error_ack(OAUTHBEARER) == base64.b64encode(b"\x01")
    assert error_ack(XOAUTH2) == b""
