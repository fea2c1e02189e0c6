"""Scan requests tell the backend which mail is new (``uidValidity``/``sinceUid``,
optionally ``messages``), against the IMAP test server and the real daemon in-process.

What a backend notices: ``UID SEARCH UID <sinceUid>:*`` finds exactly the mail it has
not accepted yet — after pushes, coalesced bursts, refused scans, reconnects, restarts
and a UIDVALIDITY change — and with envelopes switched on it gets every new message's
sender and subject, bounded and decoded, however hostile the headers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import trio
from trio_idle_testing.backend import Reply, ScanRequest

from tests.harness import ListSource, running_daemon
from tests.reliability.rig import Rig, mailbox_name
from trio_idle.imap.envelope import LIMITS, MAX_ENVELOPES

A = mailbox_name(1, "range")


def _mail(n: int, subject: str | None = None) -> bytes:
    subject = subject if subject is not None else f"range #{n}"
    return (
        f"From: Sender {n} <s{n}@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <m{n}@example.test>\r\n\r\nbody {n}\r\n"
    ).encode()


def _range(request: ScanRequest) -> tuple[Any, Any, Any]:
    body = request.body
    return body.get("uidValidity"), body.get("sinceUid"), body.get("uidValidityChanged")


async def _next_finished(rig: Rig, count: int) -> ScanRequest:
    await rig.backend.wait_for_requests(count, email=A, finished=True)
    return rig.backend.requests_for(A)[count - 1]


async def test_each_push_carries_the_uid_of_the_new_mail(rig: Rig) -> None:
    source = rig.source(A)
    for n in range(3):  # old mail: not new to the daemon's first session
        rig.server.append(A, _mail(n))
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            uid = rig.ledger.append(A).uid
            first = await _next_finished(rig, 1)
            assert _range(first) == (1000, 4, None) and uid == 4
            uid = rig.ledger.append(A).uid
            second = await _next_finished(rig, 2)
            assert _range(second) == (1000, 5, None) and uid == 5
            assert "messages" not in second.body  # envelopes are off by default
            await rig.quiet(daemon, A)
    rig.ledger.check()


async def test_a_refused_scan_keeps_its_range_for_the_next_one(rig: Rig) -> None:
    source = rig.source(A)
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            rig.backend.script(A, [Reply(400)])  # refused for good: not retried
            rig.ledger.append(A)
            refused = await _next_finished(rig, 1)
            assert refused.status == 400 and _range(refused) == (1000, 1, None)
            rig.ledger.append(A)
            after = await _next_finished(rig, 2)
            assert after.status == 200 and _range(after) == (1000, 1, None)
            rig.ledger.append(A)
            third = await _next_finished(rig, 3)
            assert _range(third) == (1000, 3, None)
            await rig.quiet(daemon, A)
    rig.ledger.check()


async def test_a_retried_scan_keeps_its_range_and_a_coalesced_one_starts_after_it(
    rig: Rig,
) -> None:
    source = rig.source(A)
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            rig.backend.script(A, [Reply(503)])
            gate = rig.backend.hold(A)
            rig.ledger.append(A)
            await rig.backend.wait_for_requests(1, email=A)
            for _ in range(5):  # a burst while the first scan is held: one pending scan
                rig.ledger.append(A)
            handle = rig.handle(daemon, A)
            await rig.logs.wait_until(lambda: bool(handle.coalescer.pending))
            gate.release()
            await rig.quiet(daemon, A)
    requests = rig.backend.requests_for(A)
    assert [r.status for r in requests] == [503, 200, 200]
    assert [_range(r) for r in requests] == [(1000, 1, None)] * 2 + [(1000, 2, None)]
    rig.ledger.check()


async def test_mail_that_arrived_while_disconnected_is_in_the_catch_up_range(rig: Rig) -> None:
    source = rig.source(A)
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            first = await rig.idle(A)
            rig.ledger.append(A)
            await _next_finished(rig, 1)
            rig.server.drop(A)  # no checkpoint until the appends: nobody is connected
            rig.ledger.append(A, note="while down")
            rig.ledger.append(A, note="while down")
            await rig.idle(A, after=first)
            catch_up = await _next_finished(rig, 2)
            assert catch_up.reason == "reconnect" and _range(catch_up) == (1000, 2, None)
            await rig.quiet(daemon, A)
    rig.ledger.check()


async def test_a_uidvalidity_change_says_so_and_carries_no_since_uid(rig: Rig) -> None:
    source = rig.source(A)
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            first = await rig.idle(A)
            rig.ledger.append(A)
            await _next_finished(rig, 1)
            await rig.server.restart(new_uidvalidity=True)
            await rig.idle(A, after=first)
            changed = await _next_finished(rig, 2)
            assert _range(changed) == (1001, None, True)
            rig.ledger.append(A)
            after = await _next_finished(rig, 3)
            assert _range(after) == (1001, 2, None)  # renumbered 1..1, the new mail is 2
            await rig.quiet(daemon, A)
    rig.ledger.check()


async def test_the_range_is_right_after_a_restart(rig: Rig, tmp_path: Path) -> None:
    settings = rig.settings(
        TRIO_IDLE_STATE="sqlite", TRIO_IDLE_STATE_PATH=str(tmp_path / "state.sqlite3")
    )
    source = rig.source(A)
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            startup = await _next_finished(rig, 1)  # new to the store: everything
            assert _range(startup) == (1000, None, None) and startup.reason == "startup"
            rig.ledger.append(A)
            assert _range(await _next_finished(rig, 2)) == (1000, 1, None)
            await rig.quiet(daemon, A)
    for _ in range(3):
        rig.ledger.append(A, note="while the daemon was stopped")
    async with running_daemon(settings, ListSource(rig.rows(A))) as daemon:
        with trio.fail_after(10):
            catch_up = await _next_finished(rig, 3)
            assert catch_up.reason == "startup" and _range(catch_up) == (1000, 2, None)
            await rig.quiet(daemon, A)
    rig.ledger.check()


#: the only FETCH the envelope fetch may send: no body section, nothing that sets \\Seen
ENVELOPE_FETCH = re.compile(
    rb"[A-Za-z0-9.]+ UID FETCH ([0-9]+(?:,[0-9]+)*) \(UID ENVELOPE RFC822\.SIZE\)"
)


async def test_the_envelope_fetch_reads_no_body_and_leaves_mail_unread(rig: Rig) -> None:
    """What a user notices: new mail stays unread in their client. The server received
    exactly ``UID FETCH <new uids> (UID ENVELOPE RFC822.SIZE)``: no ``BODY[...]``,
    ``RFC822``/``RFC822.TEXT`` or ``STORE``, so nothing sets ``\\Seen``, and no body text
    reaches the backend."""
    source = rig.source(A)
    async with running_daemon(rig.settings(TRIO_IDLE_SCAN_ENVELOPES="true"), source) as daemon:
        with trio.fail_after(10):
            await rig.idle(A)
            gate = rig.backend.hold(A)
            rig.server.append(A, _mail(1))
            await rig.backend.wait_for_requests(1, email=A)
            for n in (2, 3):  # two at once: one fetch of both
                rig.server.append(A, _mail(n))
            handle = rig.handle(daemon, A)
            await rig.logs.wait_until(lambda: bool(handle.coalescer.pending))
            gate.release()
            await rig.quiet(daemon, A)
    sent = [line for user, line in rig.server.command_lines if user == A]
    fetches = [line for line in sent if b"FETCH" in line.upper()]
    assert [ENVELOPE_FETCH.fullmatch(line) is not None for line in fetches] == [True, True], fetches
    assert [m.group(1) for line in fetches if (m := ENVELOPE_FETCH.fullmatch(line))] == [
        b"1",
        b"2,3",
    ]
    assert not [line for line in sent if re.search(rb"BODY|RFC822(?!\.SIZE)|STORE", line, re.I)]
    mailbox = rig.server.mailbox(A)
    assert len(mailbox.messages) == 3 and mailbox.unseen == 3
    assert all("\\Seen" not in m.flags for m in mailbox.messages)
    first, second = rig.backend.requests_for(A)
    assert [m["subject"] for m in first.body["messages"] + second.body["messages"]] == [
        "range #1",
        "range #2",
        "range #3",
    ]
    assert sorted(first.body["messages"][0]) == [
        "date",
        "from",
        "messageId",
        "size",
        "subject",
        "uid",
    ]
    assert not [r for r in (first, second) if b"body " in r.raw_body]


HOSTILE_SUBJECTS = (
    "x" * 200_000,  # a huge subject (sent as a literal)
    "=?bogus-charset?Q?caf=E9?= and =?utf-8?B?!!!not-base64?=",
    "=?utf-8?q?Gr=C3=BC=C3=9Fe?= (unbalanced paren",
    'tab\there \x1b[31mred\x1b[0m and a quote " and a backslash \\',
    "=?iso-8859-1?q?=E0_la_carte?=",
    # codecs that are no mail charset: their decoders raised out of the parser, and the
    # session reconnected in a loop
    "=?idna?q?caf=C3=A9?= =?punycode?B?/w==?= =?undefined?q?x?= =?rot13?q?y?=",
)


async def test_envelopes_of_hostile_mail_arrive_decoded_and_bounded(rig: Rig) -> None:
    source = rig.source(A)
    async with running_daemon(rig.settings(TRIO_IDLE_SCAN_ENVELOPES="true"), source) as daemon:
        with trio.fail_after(15):
            await rig.idle(A)
            gate = rig.backend.hold(A)
            first_uid = rig.server.append(A, _mail(0))
            await rig.backend.wait_for_requests(1, email=A)
            for n, subject in enumerate(HOSTILE_SUBJECTS, start=1):
                rig.server.append(A, _mail(n, subject))
            handle = rig.handle(daemon, A)
            await rig.logs.wait_until(lambda: bool(handle.coalescer.pending))
            gate.release()
            await rig.quiet(daemon, A)
            # the session survived the fetches: still the first connection, idling
            assert [s.idling for s in rig.server.sessions(A)] == [True]
            assert not rig.logs.matching("connection lost")
    first, second = rig.backend.requests_for(A)
    assert [m["uid"] for m in first.body["messages"]] == [first_uid]
    assert first.body["messages"][0]["from"] == {"name": "Sender 0", "address": "s0@example.test"}
    assert first.body["messages"][0]["messageId"] == "<m0@example.test>"
    assert first.body["messages"][0]["size"] == len(_mail(0))
    messages = second.body["messages"]
    assert second.body["sinceUid"] == first_uid + 1
    assert [m["uid"] for m in messages] == list(range(first_uid + 1, first_uid + 7))
    subjects = [m["subject"] for m in messages]
    assert subjects[0] == "x" * (LIMITS["subject"] - 1) + "…"
    # an unknown charset reads as UTF-8, a word that cannot be decoded is left as sent
    assert subjects[1] == "caf\ufffd and =?utf-8?B?!!!not-base64?="
    assert subjects[2] == "Grüße (unbalanced paren"
    assert "\x1b" not in subjects[3] and subjects[3].endswith('quote " and a backslash \\')
    assert subjects[4] == "à la carte"
    assert subjects[5] == "café\ufffdxy"  # read as UTF-8


async def test_sixty_new_mails_at_once_send_the_range_only(rig: Rig) -> None:
    source = rig.source(A)
    async with running_daemon(rig.settings(TRIO_IDLE_SCAN_ENVELOPES="true"), source) as daemon:
        with trio.fail_after(15):
            await rig.idle(A)
            gate = rig.backend.hold(A)
            rig.ledger.append(A)
            await rig.backend.wait_for_requests(1, email=A)
            for _ in range(60):
                rig.ledger.append(A)
            handle = rig.handle(daemon, A)
            await rig.logs.wait_until(lambda: bool(handle.coalescer.pending))
            gate.release()
            await rig.quiet(daemon, A)
            rig.ledger.append(A)  # afterwards: one message, envelopes again
            third = await _next_finished(rig, 3)
            await rig.quiet(daemon, A)
    first, second = rig.backend.requests_for(A)[:2]
    assert len(first.body["messages"]) == 1
    assert MAX_ENVELOPES < 60 and "messages" not in second.body
    assert _range(second) == (1000, 2, None)
    assert _range(third) == (1000, 62, None) and [m["uid"] for m in third.body["messages"]] == [62]
    assert daemon.stats.get("envelope_fetches", "range") == 1
    rig.ledger.check()
