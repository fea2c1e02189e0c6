"""ResponseFramer: complete IMAP responses out of arbitrary reads, in linear time, bounded."""

from __future__ import annotations

import random

import pytest

from trio_idle.imap.framing import (
    MAX_LITERALS,
    FrameError,
    FrameTooLarge,
    ResponseFramer,
    format_size,
)

KiB = 1024
MiB = 1024 * KiB

#: What a server might send during one session: greeting, a SELECT answer, IDLE pushes,
#: FETCH responses with literals (one of them binary, containing CRLF and "{3}\r\n").
RESPONSES = [
    b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n",
    b"* CAPABILITY IMAP4rev1 IDLE\r\n",
    b"A1 OK done\r\n",
    b"* 3 EXISTS\r\n",
    b"* OK [UIDVALIDITY 7] ok\r\n",
    b"* FLAGS (\\Seen \\Answered {odd})\r\n",
    b"+ idling\r\n",
    b"* 4 FETCH (BODY[] {12}\r\nhello\r\nworld UID 9)\r\n",
    b"* 5 FETCH (BODY[HEADER] {7}\r\n{3}\r\nab BODY[TEXT] ~{0}\r\n)\r\n",
    b"* 6 FETCH (BODY[] {2}\r\n\r\n)\r\n",
    b"\r\n",
    b'* LIST () "/" {5}\r\nIN\rBX\r\n',
    b"A2 OK [READ-WRITE] SELECT completed\r\n",
]
STREAM = b"".join(RESPONSES)


def frame_all(framer: ResponseFramer, chunks: list[bytes]) -> list[bytes]:
    out = []
    for chunk in chunks:
        framer.feed(chunk)
        while (response := framer.next_response()) is not None:
            out.append(response)
    return out


def random_chunks(data: bytes, rng: random.Random, biggest: int = 20) -> list[bytes]:
    chunks, i = [], 0
    while i < len(data):
        n = rng.randint(0, biggest)  # empty reads included
        chunks.append(data[i : i + n])
        i += n
    return chunks


def framer(max_line: int = MiB, max_literal: int = MiB) -> ResponseFramer:
    return ResponseFramer(max_line=max_line, max_literal=max_literal)


def test_whole_stream_gives_each_response_with_its_literals() -> None:
    f = framer()
    assert frame_all(f, [STREAM]) == RESPONSES
    assert f.buffered == 0


@pytest.mark.parametrize("seed", range(40))
def test_any_split_into_reads_gives_the_same_responses(seed: int) -> None:
    rng = random.Random(seed)
    f = framer()
    assert frame_all(f, random_chunks(STREAM, rng, biggest=rng.choice([1, 3, 20, 200]))) == (
        RESPONSES
    )


def test_one_byte_at_a_time_gives_the_same_responses() -> None:
    f = framer()
    assert frame_all(f, [bytes([b]) for b in STREAM]) == RESPONSES


def test_incomplete_response_is_held_until_it_ends() -> None:
    f = framer()
    f.feed(b"* 4 FETCH (BODY[] {5}\r\nhel")
    assert f.next_response() is None
    f.feed(b"lo")
    assert f.next_response() is None  # literal complete, the line's end is not
    f.feed(b")\r")
    assert f.next_response() is None
    f.feed(b"\n* 1 EX")
    assert f.next_response() == b"* 4 FETCH (BODY[] {5}\r\nhello)\r\n"
    assert f.next_response() is None
    assert f.buffered == len(b"* 1 EX")


def test_crlf_inside_a_literal_does_not_end_the_response() -> None:
    f = framer()
    data = b"* 1 FETCH (BODY[] {6}\r\n\r\n\r\n\r\n)\r\n"
    assert frame_all(f, [data]) == [data]


def test_braces_that_are_not_a_literal_are_text() -> None:
    f = framer()
    lines = [b"* OK {}\r\n", b"* OK }\r\n", b"* OK {x}\r\n", b"* OK {5} later\r\n", b"{1\r\n"]
    assert frame_all(f, [b"".join(lines)]) == lines


def test_a_line_of_exactly_the_limit_is_accepted_however_it_is_split() -> None:
    line = b"*" * 100 + b"\r\n"
    for cut in range(1, len(line)):
        f = framer(max_line=100)
        assert frame_all(f, [line[:cut], line[cut:]]) == [line]


def test_a_line_without_crlf_over_the_limit_is_refused_before_it_ends() -> None:
    f = framer(max_line=MiB)
    for _ in range(16):
        f.feed(b"x" * (64 * KiB))
        assert f.next_response() is None  # exactly 1 MiB so far: still allowed
    f.feed(b"x" * (200 * KiB))
    with pytest.raises(FrameTooLarge) as info:
        f.next_response()
    assert str(info.value) == "server sent a line longer than 1 MiB without CRLF"
    assert f.buffered == 0  # the buffer is freed at once


def test_an_oversized_line_that_arrives_whole_is_refused_too() -> None:
    f = framer(max_line=1000)
    f.feed(b"* " + b"x" * 2000 + b"\r\n")
    with pytest.raises(FrameTooLarge, match=r"^server sent a 2.0 KiB line \(limit 1000 bytes\)$"):
        f.next_response()


def test_text_around_literals_counts_towards_the_line_limit() -> None:
    f = framer(max_line=100)
    f.feed(b"* " + b"a" * 60 + b" {1}\r\nx" + b"b" * 60 + b"\r\n")
    with pytest.raises(FrameTooLarge, match="line"):
        f.next_response()


def test_a_huge_literal_is_refused_when_announced_before_its_data() -> None:
    f = framer(max_literal=MiB)
    f.feed(b"* 1 FETCH (BODY[] {2147483648}\r\n")
    with pytest.raises(FrameTooLarge) as info:
        f.next_response()
    assert str(info.value) == "server announced a 2 GiB literal (limit 1 MiB)"
    f2 = framer(max_literal=MiB)
    f2.feed(b"* 1 FETCH (BODY[] {999999999}\r\n")
    with pytest.raises(FrameTooLarge) as info:
        f2.next_response()
    assert str(info.value) == "server announced a 953.7 MiB literal (limit 1 MiB)"


def test_a_literal_of_exactly_the_limit_is_accepted() -> None:
    f = framer(max_literal=1000)
    data = b"* 1 FETCH (BODY[] {1000}\r\n" + b"z" * 1000 + b")\r\n"
    assert frame_all(f, [data]) == [data]


def test_literals_of_one_response_add_up() -> None:
    f = framer(max_literal=1000)
    f.feed(b"* 1 FETCH (A {600}\r\n" + b"z" * 600 + b" B {600}\r\n")
    with pytest.raises(FrameTooLarge) as info:
        f.next_response()
    assert str(info.value) == "server sent 1.2 KiB of literals in one response (limit 1000 bytes)"


def test_literal_budget_is_per_response() -> None:
    f = framer(max_literal=1000)
    one = b"* 1 FETCH (A {600}\r\n" + b"z" * 600 + b")\r\n"
    assert frame_all(f, [one * 3]) == [one] * 3


def test_too_many_literals_in_one_response_are_refused() -> None:
    f = framer()
    f.feed(b"* X" + b" {0}\r\n" * (MAX_LITERALS + 1))
    with pytest.raises(FrameTooLarge, match=f"^server sent more than {MAX_LITERALS} literals"):
        f.next_response()
    ok = framer()
    data = b"* X" + b" {0}\r\n" * MAX_LITERALS + b")\r\n"
    assert frame_all(ok, [data]) == [data]


def test_an_absurdly_long_literal_size_is_refused_without_converting_it() -> None:
    f = framer()
    f.feed(b"* 1 FETCH (BODY[] {" + b"9" * 100_000 + b"}\r\n")
    with pytest.raises(FrameTooLarge, match=r"^server announced a literal of more than 18 digits"):
        f.next_response()


def test_a_non_synchronizing_literal_from_a_server_is_a_protocol_error() -> None:
    f = framer()
    f.feed(b"* 1 FETCH (BODY[] {5+}\r\nhello)\r\n")
    with pytest.raises(FrameError, match=r"non-synchronizing literal \{n\+\}") as info:
        f.next_response()
    assert not isinstance(info.value, FrameTooLarge)


def test_after_an_error_every_call_raises_it_and_nothing_is_buffered() -> None:
    f = framer(max_line=10)
    f.feed(b"x" * 11)
    with pytest.raises(FrameTooLarge) as first:
        f.next_response()
    f.feed(b"\r\n* 1 EXISTS\r\n")
    with pytest.raises(FrameTooLarge) as again:
        f.next_response()
    assert again.value is first.value
    assert f.buffered == 0


def test_same_error_kind_whatever_the_split() -> None:
    data = b"* 1 EXISTS\r\n* " + b"y" * 300 + b"\r\n"
    for seed in range(20):
        f = framer(max_line=200)
        with pytest.raises(FrameTooLarge, match="line"):
            frame_all(f, random_chunks(data, random.Random(seed)))


def test_a_long_line_fed_one_byte_at_a_time_is_scanned_in_linear_time() -> None:
    n = 200_000
    f = framer(max_line=MiB)
    for _ in range(n):
        f.feed(b"x")
        assert f.next_response() is None
    f.feed(b"\r\n")
    assert f.next_response() == b"x" * n + b"\r\n"
    # each byte is looked at when it arrives and once more as the possible CR of a CRLF
    assert f.scanned <= 2 * (n + 2)


def test_many_responses_in_one_read_are_scanned_once() -> None:
    data = b"* 1 FETCH (FLAGS (\\Seen))\r\n" * 3000
    f = framer()
    assert len(frame_all(f, [data])) == 3000
    assert f.scanned == len(data)


def test_literal_data_is_skipped_not_scanned() -> None:
    body = b"q" * 500_000
    data = b"* 1 FETCH (BODY[] {500000}\r\n" + body + b")\r\n"
    f = framer()
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    assert frame_all(f, chunks) == [data]
    assert f.scanned < 100


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (MiB, "1 MiB"),
        (MiB + MiB // 5, "1.2 MiB"),
        (2 * 1024 * MiB, "2 GiB"),
        (2**70, "1024 EiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
