"""No plaintext fallback: when STARTTLS is missing or refused, the password is never sent."""

from __future__ import annotations

import trio

from tests.harness import ListSource, make_settings, row, running_daemon
from tests.reliability.rig import PASSWORD, Rig
from tests.reliability.scripted_server import Peer, ScriptedServer

VICTIM = "victim@rel.test"


class Downgrader:
    """A server (or a middlebox) that strips STARTTLS or refuses it, and records LOGINs."""

    def __init__(self, *, advertise: bool) -> None:
        self.advertise = advertise
        self.commands: list[bytes] = []

    async def __call__(self, peer: Peer) -> None:
        caps = b"IMAP4rev1 IDLE" + (b" STARTTLS" if self.advertise else b"")
        await peer.send(b"* OK [CAPABILITY " + caps + b"] ready\r\n")
        while True:
            line = await peer.line()
            self.commands.append(line)
            tag, _, rest = line.partition(b" ")
            name = rest.split(b" ", 1)[0].upper()
            if name == b"CAPABILITY":
                await peer.send(b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK done\r\n")
            elif name == b"STARTTLS":
                await peer.send(tag + b" NO not today\r\n")
            else:
                await peer.send(tag + b" OK whatever you say\r\n")


async def _run(rig: Rig, nursery: trio.Nursery, downgrader: Downgrader) -> None:
    server = ScriptedServer(downgrader)
    await nursery.start(server.serve)
    source = ListSource([row(VICTIM, VICTIM, PASSWORD, server.port)])
    settings = make_settings(rig.backend.url, TRIO_IDLE_IMAP_SECURITY="starttls")
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(10):
            await server.wait_connections(2)  # failed, backed off, tried again
            await rig.log(f"[idle/{VICTIM}] connect failed: 127.0.0.1:{server.port}")
        assert daemon.stats.get("internal_errors") == 0
    sent = b"\n".join(downgrader.commands)
    assert b"LOGIN" not in sent.upper() and PASSWORD.encode() not in sent
    assert b"AUTHENTICATE" not in sent.upper()


async def test_missing_starttls_never_falls_back_to_plaintext_login(
    rig: Rig, nursery: trio.Nursery
) -> None:
    await _run(rig, nursery, Downgrader(advertise=False))
    assert rig.logs.matching("does not offer STARTTLS")


async def test_refused_starttls_never_falls_back_to_plaintext_login(
    rig: Rig, nursery: trio.Nursery
) -> None:
    downgrader = Downgrader(advertise=True)
    await _run(rig, nursery, downgrader)
    assert any(b"STARTTLS" in c.upper() for c in downgrader.commands)
