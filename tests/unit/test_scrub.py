"""The scrubber: secrets masked in every spelling, one printable line, bounded length."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus

import pytest

from trio_idle.core.scrub import (
    MASK,
    MIN_SUBSTRING,
    PLAIN,
    WEAK_BELOW,
    Scrubber,
    escape_controls,
    redact_url,
    url_secrets,
    weakly_masked,
)

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


# -- passwords that URL-encode: every spelling the scrubber claims ------------------------

#: spaces (``%20`` / ``+``), URL delimiters, a quote, a backslash and a non-ASCII letter
SPACED = 'S3 cret pw/+&=?%ü "q\\'
#: the same kinds of characters, but shorter than MIN_SUBSTRING: the whole-token rule
SPACED_SHORT = "pa ss/&ü"


def spellings(secret: str) -> dict[str, str]:
    """Each form the scrubber's docstring promises, by name."""
    raw = secret.encode()
    return {
        "raw": secret,
        "imap-quoted": secret.replace("\\", "\\\\").replace('"', '\\"'),
        "repr": repr(secret)[1:-1],
        "repr-bytes": repr(raw)[2:-1],
        "json": json.dumps(secret)[1:-1],
        "json-utf8": json.dumps(secret, ensure_ascii=False)[1:-1],
        "url-%20": quote(secret, safe=""),
        "url-plus": quote_plus(secret, safe=""),
        "base64": base64.b64encode(raw).decode(),
    }


def test_the_spaced_passwords_really_have_the_url_encoded_spellings() -> None:
    for secret in (SPACED, SPACED_SHORT):
        forms = spellings(secret)
        assert "%20" in forms["url-%20"] and "+" not in forms["url-%20"].replace("%2B", "")
        assert "+" in forms["url-plus"] and "%20" not in forms["url-plus"]
        assert len(set(forms.values())) >= 6  # the spellings differ from each other
    assert len(SPACED) >= MIN_SUBSTRING > len(SPACED_SHORT)


@pytest.mark.parametrize("secret", [SPACED, SPACED_SHORT], ids=["long", "short"])
@pytest.mark.parametrize("form", list(spellings(SPACED)))
@pytest.mark.parametrize(
    "context",
    [
        "server said: {} (end)",
        'A1 NO [AUTHENTICATIONFAILED] you sent "{}"',
        "GET /login?user=a&pw={}&x=1",
        "{}",
    ],
    ids=["spaced", "quoted", "query", "alone"],
)
def test_a_password_with_spaces_is_masked_in_every_spelling(
    secret: str, form: str, context: str
) -> None:
    spelling = spellings(secret)[form]
    text = context.format(spelling)
    out = Scrubber([secret], limit=1000)(text)
    assert spelling not in out, out
    assert MASK in out
    assert out.startswith(context.partition("{}")[0]), out


# -- the boundary rule: a short secret is never revealed by masking inside a word --------


@pytest.mark.parametrize(
    "text",
    [
        "TLS handshake failed: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)",
        "NO [AUTHENTICATIONFAILED] WRONGPASSWORD",
        "ALERT: xWRONG",
        "Überschrift WRONGÜ",  # a word of any script is a word
    ],
)
def test_a_short_password_inside_a_longer_word_is_left_readable(text: str) -> None:
    assert Scrubber(["WRONG"])(text) == text


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('A1 LOGIN alice "WRONG"', f"A1 LOGIN alice {MASK}"),
        ('you sent: LOGIN alice "WRONG" (bad)', f'you sent: LOGIN alice "{MASK}" (bad)'),
        (
            "NO [AUTHENTICATIONFAILED] bad password WRONG.",
            f"NO [AUTHENTICATIONFAILED] bad password {MASK}.",
        ),
        ("ERR password=WRONG&user=alice", f"ERR password={MASK}&user=alice"),
        ("b'WRONG'", f"b'{MASK}'"),
        ("V1JPTkc= (base64)", f"{MASK}= (base64)"),
        (
            "[SSL: WRONG_VERSION_NUMBER] but the server echoed WRONG",
            f"[SSL: WRONG_VERSION_NUMBER] but the server echoed {MASK}",
        ),
    ],
)
def test_a_short_password_the_server_echoes_as_a_token_is_masked(text: str, shown: str) -> None:
    assert Scrubber(["WRONG"])(text) == shown


def test_a_long_secret_is_masked_even_glued_inside_a_word() -> None:
    secret = "S3ntinelLongPw"  # >= MIN_SUBSTRING: a coincidence is too unlikely to matter
    assert len(secret) >= MIN_SUBSTRING
    assert Scrubber([secret])(f"xx{secret}yy_{secret}") == f"xx{MASK}yy_{MASK}"


def test_a_short_secret_beginning_with_punctuation_is_masked_after_a_word() -> None:
    # the boundary rule looks at the word characters of the secret's own edges
    assert Scrubber(["#pin1"])("code#pin1 ok") == f"code{MASK} ok"


def test_passwords_too_short_to_mask_safely_are_flagged() -> None:
    assert weakly_masked("WRONG") and weakly_masked("a" * (WEAK_BELOW - 1))
    assert not weakly_masked("a" * WEAK_BELOW) and not weakly_masked("")


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
