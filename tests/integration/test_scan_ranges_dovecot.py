"""Against real Dovecot: scan requests carry the range of the new mail, and with
envelopes on, its decoded, bounded envelopes (Dovecot's own ENVELOPE rendering)."""

from __future__ import annotations

import trio
from trio_idle_testing.backend import Reply, ScanBackend

from tests.harness import ListSource, LogCapture, make_settings, row, running_daemon
from tests.servers.dovecot import DovecotServer
from trio_idle.imap.envelope import LIMITS, MAX_ENVELOPES


def _mail(n: int, subject: str) -> bytes:
    return (
        f"From: =?utf-8?q?J=C3=BCrgen?= <j{n}@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <d{n}@example.test>\r\n\r\nbody {n}\r\n"
    ).encode()


async def test_ranges_and_envelopes_from_dovecot(
    dovecot: DovecotServer, backend: ScanBackend, logs: LogCapture
) -> None:
    user = dovecot.new_user("ranges")
    for n in range(3):  # old mail, before the daemon watches
        await dovecot.aappend(user.email, user.password, _mail(n, f"old {n}"))
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_SCAN_ENVELOPES="true",
        TRIO_IDLE_SCAN_TIMEOUT="60s",
    )
    source = ListSource([row("ranges", user.email, user.password, dovecot.plain_port)])
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await logs.wait_for(f"[idle/{user.email}] connected")
            await dovecot.aappend(user.email, user.password, _mail(3, "=?utf-8?B?R3LDvMOfZQ==?="))
            await backend.wait_for_requests(1, email=user.email, finished=True)
            first = backend.requests_for(user.email)[0].body
            assert first["sinceUid"] == 4 and isinstance(first["uidValidity"], int)
            (message,) = first["messages"]
            assert message["uid"] == 4 and message["subject"] == "Grüße"
            assert message["from"] == {"name": "Jürgen", "address": "j3@example.test"}
            assert message["messageId"] == "<d3@example.test>"

            # refused for good: the next scan starts where this one did
            backend.script(user.email, [Reply(400)])
            await dovecot.aappend(user.email, user.password, _mail(4, "y" * 5000))
            await backend.wait_for_requests(2, email=user.email, finished=True)
            gate = backend.hold(user.email)
            await dovecot.aappend(user.email, user.password, _mail(5, "after the refusal"))
            await backend.wait_for_requests(3, email=user.email)
            for n in range(6, 6 + MAX_ENVELOPES + 10):  # a burst beyond the envelope limit
                await dovecot.aappend(user.email, user.password, _mail(n, f"burst {n}"))
            handle = daemon.reconciler.handles["ranges"]
            await logs.wait_until(lambda: bool(handle.coalescer.pending))

            # Dovecot announces appends to an IDLE session when it notices them (slower
            # under load); the pending scan's UID SEARCH sees only what the session's view
            # holds, so release it once all 60 were announced (UIDs 7..66)
            def all_announced() -> bool:
                mailbox = handle.memory.mailbox
                return mailbox is not None and (mailbox.uidnext or 0) >= 67

            await logs.wait_until(all_announced)
            gate.release()
            await logs.wait_until(
                lambda: not handle.coalescer.active and not handle.coalescer.pending
            )
    refused, third, fourth = (r.body for r in backend.requests_for(user.email)[1:4])
    assert (
        refused["sinceUid"] == 5
        and refused["messages"][0]["subject"] == "y" * (LIMITS["subject"] - 1) + "…"
    )
    assert third["sinceUid"] == 5 and [m["uid"] for m in third["messages"]] == [5, 6]
    assert fourth["sinceUid"] == 7 and "messages" not in fourth  # 60 new: the range only
