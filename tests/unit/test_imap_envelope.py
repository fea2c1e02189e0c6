"""Parsing UID SEARCH / UID FETCH ENVELOPE answers from plain bytes, hostile ones included."""

from __future__ import annotations

import base64
import encodings
import encodings.aliases
import pkgutil

import pytest

from trio_idle.imap.envelope import (
    DECODE_WORK,
    LIMITS,
    MAX_ANSWER_WORK,
    MAX_RAW_FIELD,
    SLICE_WORK,
    TOKEN_WORK,
    WINDOW,
    Envelope,
    ParseMeter,
    decode_words,
    parse_fetch_envelopes,
    parse_search,
    parse_steps,
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


def parsed(responses: list[bytes]) -> list[Envelope]:
    """:func:`parse_fetch_envelopes` of an answer well within the work budget (None
    would mean the parse gave up)."""
    found = parse_fetch_envelopes(responses)
    assert found is not None
    return found


def test_literals_escapes_and_encoded_words() -> None:
    subject = b"=?utf-8?B?R3LDvMOfZQ==?= (unbalanced"
    envelope = (
        b'NIL {%d}\r\n%s (("Q \\"uoted\\" \\\\ name" NIL "q" "x.test")) '
        b"NIL NIL NIL NIL NIL NIL NIL" % (len(subject), subject)
    )
    (found,) = parsed([_fetch(3, envelope)])
    assert found.subject == "Grüße (unbalanced"
    assert found.from_name == 'Q "uoted" \\ name'
    assert found.date is None and found.message_id is None


def test_hostile_fields_are_bounded_and_stripped() -> None:
    huge = b"=?utf-8?q?" + b"A" * 300_000 + b"?="
    envelope = b"NIL {%d}\r\n%s NIL NIL NIL NIL NIL NIL NIL NIL" % (len(huge), huge)
    (found,) = parsed([_fetch(4, envelope)])
    assert found.subject is not None and len(found.subject) == LIMITS["subject"]
    control = b'NIL "bell\x07 esc\x1b[2J  many   spaces" NIL NIL NIL NIL NIL NIL NIL NIL'
    assert parsed([_fetch(5, control)])[0].subject == "bell esc[2J many spaces"


def test_bad_encodings_never_raise() -> None:
    assert decode_words("=?no-such-charset?q?abc?=") == "abc"  # unknown charset: as UTF-8
    assert isinstance(decode_words("=?utf-8?B?!!!?= and =?utf-8?B?Zm9v?="), str)
    assert decode_words("caf\udce9") == "caf\udce9"  # nothing to decode
    eight_bit = "café".encode("latin-1")
    envelope = b'NIL "%s" NIL NIL NIL NIL NIL NIL NIL NIL' % eight_bit
    assert parsed([_fetch(6, envelope)])[0].subject == "caf\ufffd"


def test_malformed_responses_are_skipped_not_raised() -> None:
    responses = [
        b'* 1 FETCH (UID 9 ENVELOPE ("unclosed\r\n',
        b"* 2 FETCH (UID 10 ENVELOPE " + b"(" * 50 + b")" * 50 + b")\r\n",
        b"* 3 FETCH (ENVELOPE (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL))\r\n",  # no UID
        b'* 4 FETCH (UID 11 ENVELOPE (NIL "ok" NIL NIL NIL NIL NIL NIL NIL NIL) {99}\r\nab',
        b"* 5 EXISTS\r\n",
        _fetch(12, PLAIN),
    ]
    assert [e.uid for e in parsed(responses)] == [12]


def test_search_numbers() -> None:
    assert parse_search([b"* SEARCH 5 3 x 3 99999999999\r\n", b"* 4 EXISTS\r\n"]) == [3, 5]
    assert parse_search([b"* SEARCH\r\n"]) == []


# -- linear work, counted (no clocks) ------------------------------------------------

KiB = 1024


def _answer(envelope: bytes, count: int = 1) -> list[bytes]:
    return [_fetch(uid, envelope) for uid in range(1, count + 1)]


#: hostile responses of 64-100 KiB (40,000 tokens at most), three of them within the
#: answer's budget: parsed to the end
ADVERSARIAL = {
    "escapes": b'NIL "' + b"\\a" * (48 * KiB) + b'" NIL NIL NIL NIL NIL NIL NIL NIL',
    "escaped quotes": b'NIL "' + b'\\"' * (48 * KiB) + b'" NIL NIL NIL NIL NIL NIL NIL NIL',
    "backslash runs": b'NIL "' + (b"\\\\" * 50 + b'\\"') * 900 + b'" NIL NIL NIL',
    "deep nesting": b"NIL NIL " + b"(((((())))))" * (3 * KiB) + b" NIL",
    "many small strings": b'NIL NIL ("" "" "" "")' * (4 * KiB),
    "many literals": b"NIL NIL " + b"{1}\r\nx " * (12 * KiB),
    "many atoms": b"NIL NIL (" + b"a " * (36 * KiB) + b")",
    "long atom": b"NIL NIL " + b"a" * (100 * KiB) + b" NIL",
    "unclosed string": b'NIL "' + b"\\a" * (48 * KiB),
}


@pytest.mark.parametrize("shape", list(ADVERSARIAL))
def test_hostile_answers_are_read_in_linear_work(shape: str) -> None:
    responses = _answer(ADVERSARIAL[shape], count=3)
    n = sum(map(len, responses))
    meter = ParseMeter()
    found = parse_fetch_envelopes(responses, meter=meter)
    # each byte is looked at about once: a search never starts again from an earlier byte
    assert meter.examined <= 2 * n
    assert meter.tokens <= n
    assert found is not None and not meter.over_budget
    assert len(found) == (0 if shape == "unclosed string" else 3)


def test_a_long_quoted_string_is_scanned_once_whatever_its_escapes() -> None:
    """The quoted string of the third review (0.67 MiB of escapes took 1.3 s): every
    backslash used to search for the closing quote again, to the end."""
    escapes = b"\\a" * (340 * KiB)
    meter = ParseMeter()
    (found,) = parse_fetch_envelopes(_answer(b'NIL "' + escapes + b'"'), meter=meter) or []
    assert found.subject == "a" * (LIMITS["subject"] - 1) + "…"
    assert len(escapes) < meter.examined <= len(escapes) + 256


def test_literal_data_is_skipped_not_scanned() -> None:
    body = b"q" * 500_000
    meter = ParseMeter()
    (found,) = (
        parse_fetch_envelopes(_answer(b"NIL {%d}\r\n%s" % (len(body), body)), meter=meter) or []
    )
    assert found.subject is not None and found.subject.startswith("qqq")
    assert meter.examined < 200


def test_only_the_envelopes_asked_for_are_decoded() -> None:
    responses = _answer(PLAIN, count=40)
    meter = ParseMeter()
    found = parse_fetch_envelopes(responses, wanted={3, 7}, meter=meter)
    assert [e.uid for e in found or []] == [3, 7]
    everything = ParseMeter()
    parse_fetch_envelopes(responses, meter=everything)
    assert meter.decoded * 20 == everything.decoded


@pytest.mark.parametrize("field", ["quoted", "literal", "atom"])
def test_a_huge_encoded_word_field_is_decoded_from_its_first_bytes_only(field: str) -> None:
    word = b"=?utf-8?q?" + b"A" * 300_000 + b"?="
    subject = {
        "quoted": b'"' + word + b'"',
        "literal": b"{%d}\r\n%s" % (len(word), word),
        "atom": word,
    }[field]
    meter = ParseMeter()
    (found,) = parse_fetch_envelopes(_answer(b"NIL " + subject), meter=meter) or []
    assert found.subject is not None and len(found.subject) == LIMITS["subject"]
    # the decoder saw the field's first MAX_RAW_FIELD bytes, not 300 KB
    assert meter.decoded <= MAX_RAW_FIELD


# -- slices: an answer of the largest size never holds the caller in one go ------------

MiB = 1024 * KiB


#: 8 MiB answers (ImapLimits.max_fetch_answer), in responses of ≤ 1 MiB + literals
HUGE = {
    "escapes": [_fetch(u, b'NIL "' + b"\\a" * (MiB // 2 - 64) + b'"') for u in range(1, 9)],
    "small strings": [_fetch(u, b'NIL NIL ("")' + b' ""' * (MiB // 3 - 64)) for u in range(1, 9)],
    "nesting": [_fetch(u, b"NIL NIL " + b"(((())))" * (MiB // 8 - 64)) for u in range(1, 9)],
    "literals": [_fetch(u, b"NIL NIL " + b"{1}\r\nx " * (MiB // 7 - 64)) for u in range(1, 9)],
    "fields": [
        _fetch(
            u,
            b'NIL "%s" (("%s" NIL "%s" "x")) NIL NIL NIL NIL NIL NIL "%s"'
            % (b"=?a?q?x\x01" * 1000, b"\x01" * 8000, b"b" * 8000, b"\x01" * 8000),
        )
        for u in range(1, 250)
    ],
}

#: the most one step can add to a slice: a field's decoding (the largest step)
LARGEST_STEP = DECODE_WORK * MAX_RAW_FIELD + 2 * WINDOW + TOKEN_WORK


@pytest.mark.parametrize("shape", list(HUGE))
def test_an_answer_of_the_largest_size_is_parsed_in_bounded_slices(shape: str) -> None:
    responses = HUGE[shape]
    assert 7 * MiB < sum(map(len, responses)) <= 8 * MiB
    meter = ParseMeter()
    steps = parse_steps(responses, meter=meter)
    pauses = 0
    with pytest.raises(StopIteration) as done:
        while True:
            next(steps)
            pauses += 1
    # it gave up at the answer's budget: the scan goes out with the range only
    assert done.value.value is None and meter.over_budget
    assert MAX_ANSWER_WORK < meter.work <= MAX_ANSWER_WORK + LARGEST_STEP
    assert pauses >= MAX_ANSWER_WORK // (SLICE_WORK + LARGEST_STEP)
    assert meter.longest_slice <= SLICE_WORK + LARGEST_STEP


def test_a_legitimate_answer_of_fifty_big_envelopes_is_within_the_budget() -> None:
    # 100 recipients in To, 100 in Cc
    recipients = b"(" + b'("Some Recipient" NIL "some.recipient" "example.test")' * 100 + b")"
    envelope = (
        b'"Mon, 7 Feb 1994 21:52:25 -0800" "=?utf-8?q?A_long_subject?= %s" '
        b'(("Ann Example" NIL "ann" "example.test")) NIL NIL %s %s NIL NIL "<id@x.test>"'
        % (b"x" * 900, recipients, recipients)
    )
    meter = ParseMeter()
    found = parse_fetch_envelopes(_answer(envelope, count=50), meter=meter)
    assert found is not None and len(found) == 50
    assert found[0].from_address == "ann@example.test"
    assert meter.work < MAX_ANSWER_WORK * 3 // 4


# -- encoded words in any charset Python knows ---------------------------------------


def _codec_names() -> list[str]:
    names = set(encodings.aliases.aliases) | set(encodings.aliases.aliases.values())
    names |= {m.name for m in pkgutil.iter_modules(encodings.__path__)}
    garbage = ["", "x" * 300, "utf-8\x00", "../os", "a.b", "utf-8*en", "\u00e9", "aliases"]
    return sorted(names) + garbage


PAYLOADS = [b"", b"abc", b"\xff\xfe\x00\x01", bytes(range(256)), b"+AGE-", b"xn--caf-dma", b"\\x"]


def test_encoded_words_in_every_codec_never_raise() -> None:
    for charset in _codec_names():
        for payload in PAYLOADS:
            b64 = base64.b64encode(payload).decode()
            qp = "".join(f"={b:02X}" for b in payload)
            for word in (f"=?{charset}?B?{b64}?=", f"=?{charset}?q?{qp}?=", f"=?{charset}?Q?a_b?="):
                text = decode_words(f"x {word} {word} y")
                assert isinstance(text, str) and text.startswith("x ") and text.endswith(" y")
            raw = f"=?{charset}?B?{b64}?=".encode("utf-8", "surrogateescape")
            envelope = b'NIL {%d}\r\n%s (({%d}\r\n%s NIL "a" "b")) NIL NIL NIL NIL NIL NIL NIL' % (
                len(raw),
                raw,
                len(raw),
                raw,
            )
            (found,) = parse_fetch_envelopes([_fetch(9, envelope)]) or []
            assert isinstance(found.subject, str) and isinstance(found.from_name, str)


def test_words_in_codecs_that_are_no_mail_charset_read_as_utf8() -> None:
    """idna, punycode and undefined raised UnicodeError out of the parser (the session
    reconnected in a loop); a bytes codec raised LookupError."""
    assert decode_words("=?idna?Q?caf=C3=A9?=") == "café"
    assert decode_words("=?punycode?B?/w==?=") == "\ufffd"
    assert decode_words("=?undefined?q?abc?= =?rot13?q?abc?=") == "abcabc"
    assert decode_words("=?utf-8?Q?a?= =?undefined?Q?b?=") == "ab"
    # and text is not reinterpreted: no punycode, no backslash escapes
    assert decode_words("=?punycode?Q?bcher-kva?=") == "bcher-kva"
    assert decode_words("=?unicode_escape?Q?=5Cu00e9?=") == "\\u00e9"
