"""The scrubber: secrets masked in every spelling, one printable line, bounded length."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import pytest

from trio_idle.core.scrub import MASK, PLAIN, Scrubber, escape_controls, redact_url, url_secrets

PASSWORD = 'p@ss"w\\rd-Ünï'


@pytest.mark.parametrize(
    "spelling",
    [
        PASSWORD,
        PASSWORD.replace("\\", "\\\\").replace('"', '\\"'),  # IMAP quoted string
        repr(PASSWORD)[1:-1],
        repr(PASSWORD.encode())[2:-1],  # b'...' as aioimaplib's Abort quotes a response
        json.dumps(PASSWORD)[1:-1],
        quote(PASSWORD, safe=""),
        base64.b64encode(PASSWORD.encode()).decode(),
    ],
)
def test_every_spelling_of_the_secret_is_masked(spelling: str) -> None:
    text = f"server said: {spelling} (end)"
    out = Scrubber([PASSWORD])(text)
    assert spelling not in out
    assert MASK in out
    assert out.startswith("server said: ") and out.endswith(" (end)")


def test_the_login_line_aioimaplib_quotes_back_is_masked_even_without_the_secret() -> None:
    text = 'unexpected tagged response with pending sync (FOOG1 LOGIN a@x.test "S3\\"c") '
    out = PLAIN(text)
    assert "S3" not in out
    assert "FOOG1 LOGIN a@x.test ********" in out


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("a001 LOGIN user {12}", "{12}"),
        ("A7 AUTHENTICATE XOAUTH2 dXNlcj1hQGIBYXV0aD1CZWFyZXIgdG9r", "dXNlcj1h"),
        ("Authorization: Bearer ya29.a0AfH6SM-token", "ya29"),
        ("cannot reach https://user:hunter2@backend.test/api", "hunter2"),
        ("dsn postgresql://app:pg-pw@db:5432/x failed", "pg-pw"),
    ],
)
def test_credentials_in_known_shapes_are_masked_whoever_they_belong_to(
    text: str, hidden: str
) -> None:
    assert hidden not in PLAIN(text)


@pytest.mark.parametrize(
    "ours",
    [
        "no answer to LOGIN within 1s",
        "login rejected for a@x.test: NO [AUTHENTICATIONFAILED]",
        "/status refused: wrong bearer token (from 127.0.0.1:5555)",
    ],
)
def test_our_own_words_stay_readable(ours: str) -> None:
    assert PLAIN(ours) == ours


def test_control_characters_are_escaped_into_one_printable_line() -> None:
    out = PLAIN("bad\r\n[idle/db] forged\x00\x1b[31m\u2028\u202etxt\x7f")
    assert out == "bad\\x0d\\x0a[idle/db] forged\\x00\\x1b[31m\\u2028\\u202etxt\\x7f"
    assert escape_controls("tab\tok") == "tab\\x09ok"


def test_long_text_is_cut_and_marked() -> None:
    out = PLAIN("x" * 10_000)
    assert len(out) == 200 and out.endswith("…")
    assert len(Scrubber(limit=50)("y" * 51)) == 50


def test_a_secret_straddling_the_cut_is_still_masked() -> None:
    secret = "straddling-secret-value"
    out = Scrubber([secret], limit=30)("a" * 20 + secret)
    assert "straddling" not in out and "strad" not in out


def test_short_secrets_are_masked_only_where_they_stand_alone() -> None:
    out = Scrubber(["ab"])("ab cab ab. tab")
    assert out == f"{MASK} cab {MASK}. tab"


def test_bytes_and_hostile_objects_are_made_text() -> None:
    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert PLAIN(b"caf\xc3\xa9 \xff") == "café \ufffd"
    assert PLAIN(Hostile()) == "<unprintable Hostile: RuntimeError>"


def test_urls_lose_their_credentials() -> None:
    assert redact_url("http://u:p@h:1/x?y=1") == "http://********@h:1/x?y=1"
    assert redact_url("http://h:1/x") == "http://h:1/x"
    assert redact_url("http://[::1") == "<unparsable URL>"
    assert url_secrets("postgresql://u:p%40ss@h/db") == [
        "postgresql://u:p%40ss@h/db",
        "p%40ss",
        "p@ss",
    ]
