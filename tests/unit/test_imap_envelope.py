"""Parsing UID SEARCH / UID FETCH ENVELOPE answers from plain bytes, hostile ones included."""

from __future__ import annotations

from trio_idle.imap.envelope import (
    LIMITS,
    Envelope,
    decode_words,
    parse_fetch_envelopes,
    parse_search,
)


def _fetch(uid: int, envelope: bytes, size: int = 321) -> bytes:
    return b"* %d FETCH (UID %d RFC822.SIZE %d ENVELOPE (%s))\r\n" % (uid, uid, size, envelope)


PLAIN = (
    b'"Mon, 7 Feb 1994 21:52:25 -0800" "Hello there" '
    b'(("Ann Example" NIL "ann" "example.test")) NIL NIL '
    b'((NIL NIL "bob" "example.test")) NIL NIL NIL "<id-1@example.test>"'
)


def test_a_plain_envelope() -> None:
    assert parse_fetch_envelopes([_fetch(7, PLAIN)]) == [
        Envelope(
            uid=7,
            subject="Hello there",
            from_name="Ann Example",
            from_address="ann@example.test",
            date="Mon, 7 Feb 1994 21:52:25 -0800",
            message_id="<id-1@example.test>",
            size=321,
        )
    ]
    assert Envelope(1).to_json()["from"] == {"name": None, "address": None}


def test_literals_escapes_and_encoded_words() -> None:
    subject = b"=?utf-8?B?R3LDvMOfZQ==?= (unbalanced"
    envelope = (
        b'NIL {%d}\r\n%s (("Q \\"uoted\\" \\\\ name" NIL "q" "x.test")) '
        b"NIL NIL NIL NIL NIL NIL NIL" % (len(subject), subject)
    )
    (found,) = parse_fetch_envelopes([_fetch(3, envelope)])
    assert found.subject == "Grüße (unbalanced"
    assert found.from_name == 'Q "uoted" \\ name'
    assert found.date is None and found.message_id is None


def test_hostile_fields_are_bounded_and_stripped() -> None:
    huge = b"=?utf-8?q?" + b"A" * 300_000 + b"?="
    envelope = b"NIL {%d}\r\n%s NIL NIL NIL NIL NIL NIL NIL NIL" % (len(huge), huge)
    (found,) = parse_fetch_envelopes([_fetch(4, envelope)])
    assert found.subject is not None and len(found.subject) == LIMITS["subject"]
    control = b'NIL "bell\x07 esc\x1b[2J  many   spaces" NIL NIL NIL NIL NIL NIL NIL NIL'
    assert parse_fetch_envelopes([_fetch(5, control)])[0].subject == "bell esc[2J many spaces"


def test_bad_encodings_never_raise() -> None:
    assert decode_words("=?no-such-charset?q?abc?=") == "abc"  # unknown charset: as UTF-8
    assert isinstance(decode_words("=?utf-8?B?!!!?= and =?utf-8?B?Zm9v?="), str)
    assert decode_words("caf\udce9") == "caf\udce9"  # nothing to decode
    eight_bit = "café".encode("latin-1")
    envelope = b'NIL "%s" NIL NIL NIL NIL NIL NIL NIL NIL' % eight_bit
    assert parse_fetch_envelopes([_fetch(6, envelope)])[0].subject == "caf\ufffd"


def test_malformed_responses_are_skipped_not_raised() -> None:
    responses = [
        b'* 1 FETCH (UID 9 ENVELOPE ("unclosed\r\n',
        b"* 2 FETCH (UID 10 ENVELOPE " + b"(" * 50 + b")" * 50 + b")\r\n",
        b"* 3 FETCH (ENVELOPE (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL))\r\n",  # no UID
        b'* 4 FETCH (UID 11 ENVELOPE (NIL "ok" NIL NIL NIL NIL NIL NIL NIL NIL) {99}\r\nab',
        b"* 5 EXISTS\r\n",
        _fetch(12, PLAIN),
    ]
    assert [e.uid for e in parse_fetch_envelopes(responses)] == [12]


def test_search_numbers() -> None:
    assert parse_search([b"* SEARCH 5 3 x 3 99999999999\r\n", b"* 4 EXISTS\r\n"]) == [3, 5]
    assert parse_search([b"* SEARCH\r\n"]) == []
