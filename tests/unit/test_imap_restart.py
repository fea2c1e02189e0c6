"""The answers of one IDLE restart (DONE → NOOP → IDLE), as plain server lines: what the
connection must do next, and the exact error each refusal ends the connection with.

Both ways a restart runs (written by the ticker, or by the session) use this machine,
so these texts are the ones the session logs (``connection lost: NOOP failed: NO``).
"""

from __future__ import annotations

import contextlib

import pytest

from trio_idle.core.errors import ImapError
from trio_idle.imap.restart import DONE, IDLE, NOOP, Next, RestartAnswers


def feed(answers: RestartAnswers, line: bytes) -> Next:
    """One server line as the connection hands it over: ``+ …`` is a continuation,
    ``<tag> <status> …`` a tagged answer (the parser passes its status on)."""
    if line.startswith(b"+"):
        return answers.continued()
    return answers.answered(line.split(b" ")[1].decode())


def play(answers: RestartAnswers, *lines: bytes) -> list[Next]:
    return [feed(answers, line) for line in lines]


TICK_OK = (b"A1 OK IDLE terminated", b"A2 OK NOOP completed", b"+ idling")


@pytest.mark.parametrize(
    ("noop", "pipelined", "lines", "expected"),
    [
        # the ticker's tick: DONE, NOOP, IDLE in one write; nothing to do until "+"
        (True, True, TICK_OK, [Next.WAIT, Next.WAIT, Next.IDLING]),
        # a renewal: no NOOP
        (False, True, (b"A1 OK done", b"+ idling"), [Next.WAIT, Next.IDLING]),
        # pipelining off: IDLE is written, on its own, once NOOP is answered
        (True, False, TICK_OK, [Next.WAIT, Next.SEND_IDLE, Next.IDLING]),
        (False, False, (b"A1 OK done", b"+ idling"), [Next.SEND_IDLE, Next.IDLING]),
    ],
)
def test_a_healthy_restart_ends_idling(
    noop: bool, pipelined: bool, lines: tuple[bytes, ...], expected: list[Next]
) -> None:
    answers = RestartAnswers(noop=noop, pipelined=pipelined)
    assert play(answers, *lines) == expected
    assert answers.over


def test_awaiting_names_the_command_a_timeout_would_name() -> None:
    answers = RestartAnswers(noop=True, pipelined=True)
    seen = [answers.awaiting]
    for line in TICK_OK[:2]:
        feed(answers, line)
        seen.append(answers.awaiting)
    assert seen == [DONE, NOOP, IDLE]
    renewal = RestartAnswers(noop=False, pipelined=True)
    feed(renewal, b"A1 OK done")
    assert renewal.awaiting == IDLE  # no NOOP was written: "no answer to IDLE"


DONE_OK, NOOP_OK = b"A1 OK IDLE terminated", b"A2 OK NOOP completed"


@pytest.mark.parametrize(
    ("noop", "pipelined", "lines", "error"),
    [
        (True, True, [b"A1 NO nope"], "DONE failed: IDLE ended with NO"),
        (False, False, [b"A1 BAD what"], "DONE failed: IDLE ended with BAD"),
        (True, True, [DONE_OK, b"A2 NO [UNAVAILABLE] later"], "NOOP failed: NO"),
        (True, False, [DONE_OK, b"A2 BAD x"], "NOOP failed: BAD"),
        # IDLE written on its own (pipelining off) and refused: no second chance
        (True, False, [DONE_OK, NOOP_OK, b"A3 BAD no"], "IDLE failed: server refused IDLE: BAD"),
        # refused when pipelined, then refused again on its own
        (
            True,
            True,
            [DONE_OK, NOOP_OK, b"A3 BAD alone", b"A4 NO never"],
            "IDLE failed: server refused IDLE: NO",
        ),
    ],
)
def test_a_refusal_ends_the_restart_with_the_sessions_error(
    noop: bool, pipelined: bool, lines: list[bytes], error: str
) -> None:
    answers = RestartAnswers(noop=noop, pipelined=pipelined)
    *before, last = lines
    play(answers, *before)
    with pytest.raises(ImapError) as caught:
        feed(answers, last)
    assert str(caught.value) == error
    assert type(caught.value) is ImapError  # a refusal, not a lost connection
    assert answers.over


def test_a_refused_pipelined_idle_is_sent_again_alone() -> None:
    answers = RestartAnswers(noop=True, pipelined=True)
    assert play(answers, b"A1 OK", b"A2 OK", b"A3 BAD IDLE must come alone") == [
        Next.WAIT,
        Next.WAIT,
        Next.RESEND_IDLE,  # the connection writes IDLE alone and stops pipelining it
    ]
    assert not answers.over and answers.awaiting == IDLE
    assert feed(answers, b"+ idling") == Next.IDLING


def test_a_continuation_before_idle_is_awaited_is_ignored() -> None:
    # as the parser ignores a "+" no command asked for: the restart goes on
    answers = RestartAnswers(noop=True, pipelined=True)
    assert feed(answers, b"+ early") == Next.WAIT
    assert answers.awaiting == DONE
    assert play(answers, *TICK_OK) == [Next.WAIT, Next.WAIT, Next.IDLING]


@pytest.mark.parametrize("ending", [TICK_OK, (b"A1 NO nope",)])
def test_a_restart_that_is_over_takes_no_more_answers(ending: tuple[bytes, ...]) -> None:
    answers = RestartAnswers(noop=True, pipelined=True)
    with contextlib.suppress(ImapError):  # the refusal ends it too
        play(answers, *ending)
    with pytest.raises(RuntimeError):
        answers.answered("OK")
    with pytest.raises(RuntimeError):
        answers.continued()
