"""Servers that echo the password back cannot make it reach a log, ``/status``, ``/metrics``
or the ``check --login`` table; server text cannot forge log lines.

Each script below is a hostile or broken server seen in the wild or built to leak:
aioimaplib raises an ``Abort`` quoting our whole ``LOGIN`` line when the tagged answer has
an unexpected tag, and servers put the client's input into their ``NO`` and ``BYE`` text.
The password holds a quote and a backslash, so it is sent IMAP-escaped and comes back in
several spellings; every one must be masked.
"""

from __future__ import annotations

import functools
import io
import re
import textwrap
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import ADMIN_SECRET, KEY, restore_stderr_sink, row, running_daemon
from tests.reliability.rig import Rig
from tests.reliability.scripted_server import Peer, ScriptedServer
from trio_idle import cli
from trio_idle.core import logs

#: recognisable, and awkward to quote: a double quote and a backslash
PASSWORD = 'S3ntinel"pw\\leak-9c1'
HEALTHY = "healthy@rel.test"
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")


async def _greet(peer: Peer) -> tuple[bytes, bytes]:
    """Greet, answer CAPABILITY; return the LOGIN command line (tag, whole line)."""
    await peer.send(b"* OK [CAPABILITY IMAP4rev1 IDLE] hostile server ready\r\n")
    while True:
        line = await peer.line()
        tag, _, rest = line.partition(b" ")
        if rest.upper().startswith(b"CAPABILITY"):
            await peer.send(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
        elif rest.upper().startswith(b"LOGIN"):
            return tag, line


async def wrong_tag(peer: Peer) -> None:
    # aioimaplib: Abort('unexpected tagged response with pending sync command (LOGIN ...)')
    await _greet(peer)
    await peer.send(b"ZZ99 NO nope\r\n")
    while True:
        await peer.line()


async def echo_in_no(peer: Peer) -> None:
    tag, line = await _greet(peer)
    await peer.send(tag + b" NO [AUTHENTICATIONFAILED] you sent: " + line + b"\r\n")
    while True:
        await peer.line()


async def echo_in_bye(peer: Peer) -> None:
    _tag, line = await _greet(peer)
    await peer.send(b"* BYE " + line + b" \x1b[2J forged\r\n")


async def echo_in_unavailable(peer: Peer) -> None:
    tag, line = await _greet(peer)
    await peer.send(tag + b" NO [UNAVAILABLE] try later, " + line.split(b" ", 3)[-1] + b"\r\n")


async def forged_lines(peer: Peer) -> None:
    tag, _line = await _greet(peer)
    # CR, NUL, ESC and U+2028 in the reason; bytes that are not UTF-8; very long text
    await peer.send(
        tag
        + b" NO bad\rX [idle/db] refreshed \xe2\x80\xa8 0 active \x00\x1b[31m \xff\xfe "
        + b"x" * 5000
        + b"\r\n"
    )


SCRIPTS = [wrong_tag, echo_in_no, echo_in_bye, echo_in_unavailable, forged_lines]


def _leaks(text: str) -> list[str]:
    """The spellings of PASSWORD (or the test's other secrets) found in ``text``."""
    spellings = {
        PASSWORD,
        PASSWORD.replace("\\", "\\\\").replace('"', '\\"'),
        "S3ntinel",
        "leak-9c1",
        ADMIN_SECRET,
        KEY,
    }
    return [s for s in spellings if s in text]


async def test_echoed_passwords_never_reach_logs_status_or_metrics(
    rig: Rig, nursery: trio.Nursery
) -> None:
    servers = []
    for script in SCRIPTS:
        server = ScriptedServer(script)
        await nursery.start(server.serve)
        servers.append(server)
    source = rig.source(HEALTHY)
    names = [f"{s.__name__}@rel.test" for s in SCRIPTS]
    for name, server in zip(names, servers, strict=True):
        source.rows.append(row(name, name, PASSWORD, server.port))
    settings = rig.settings(
        TRIO_IDLE_CONNECT_TIMEOUT="1s",
        TRIO_IDLE_COMMAND_TIMEOUT="1s",
        TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
        TRIO_IDLE_STATUS_TOKEN="status-token-for-the-leak-test",
    )
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(10):
            await rig.idle(HEALTHY)
            for name in names:
                # a failure line for each (auth failures then wait 15 min, others retry)
                await rig.logs.wait_until(
                    lambda n=name: any(  # type: ignore[misc]
                        f"[idle/{n}] connect failed" in line
                        or f"[idle/{n}] authentication failed" in line
                        for line in rig.logs.lines
                    )
                )
        url = daemon.supervisor.health_url if daemon.supervisor else None
        assert url is not None
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            bearer = {"authorization": "Bearer status-token-for-the-leak-test"}
            status = await client.get("/status", headers=bearer)
            metrics = await client.get("/metrics")
        assert status.status_code == 200 and metrics.status_code == 200
        # the failures are there, described, and cut short
        errors = {c["email"]: c["last_error"] for c in status.json()["connections"]}
        assert all(errors[name] for name in names), errors
        assert "unexpected tagged response" in errors["wrong_tag@rel.test"]
        assert all(len(errors[name]) <= 200 for name in names)
        rig.ledger.append(HEALTHY, "the healthy mailbox is not disturbed")
        with trio.fail_after(5):
            await rig.ledger.wait_covered()
    produced = "\n".join([rig.logs.text(), status.text, metrics.text])
    assert _leaks(produced) == [], [line for line in rig.logs.lines if _leaks(line)][:3]
    for line in rig.logs.lines:
        assert not CONTROL.search(line), repr(line)  # one log record, one printable line
    assert "\\x1b" in rig.logs.text() or "\\x0d" in rig.logs.text()  # escaped, not dropped
    assert daemon.stats.get("internal_errors") == 0


@pytest.mark.parametrize("script", [wrong_tag, echo_in_no, echo_in_bye], ids=lambda s: s.__name__)
def test_check_login_table_never_shows_the_password(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    script: object,
) -> None:
    """``trio-idle check --login`` against a server that echoes the password."""
    log_stream = io.StringIO()
    monkeypatch.setattr(
        cli, "setup_logging", functools.partial(logs.setup_logging, stream=log_stream)
    )

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            server = ScriptedServer(script)  # type: ignore[arg-type]
            await nursery.start(server.serve)
            conf = tmp_path / "connections.toml"
            conf.write_text(
                textwrap.dedent(
                    f"""
                    [[connection]]
                    id = "c1"
                    email = "victim@rel.test"
                    imap_host = "127.0.0.1"
                    imap_port = {server.port}
                    password_env = "VICTIM_PASSWORD"
                    """
                )
            )
            env = {
                "ADMIN_SECRET": ADMIN_SECRET,
                "ENCRYPTION_KEY": KEY,
                "TRIO_IDLE_SOURCE": "file",
                "TRIO_IDLE_CONNECTIONS_FILE": str(conf),
                "TRIO_IDLE_IMAP_SECURITY": "plain",
                "TRIO_IDLE_CONNECT_TIMEOUT": "2s",
                "TRIO_IDLE_COMMAND_TIMEOUT": "2s",
                "TRIO_IDLE_STATE": "none",
                "VICTIM_PASSWORD": PASSWORD,
            }
            with trio.fail_after(20):
                code = await trio.to_thread.run_sync(
                    functools.partial(cli.main, ["check", "--login"], env)
                )
            nursery.cancel_scope.cancel()
        return code

    try:
        code = trio.run(main)
    finally:
        restore_stderr_sink()  # the CLI replaced the sinks
        logs.protect_secrets(())
    out, err = capsys.readouterr()
    assert code == 1  # the login failed, and the table says so
    assert "FAILED" in out and "victim@rel.test" in out
    assert "[idle/check]" in log_stream.getvalue()
    assert _leaks(out + err + log_stream.getvalue()) == [], out


async def test_a_user_name_with_spaces_and_quotes_logs_in(rig: Rig) -> None:
    # aioimaplib sends the user name unquoted: 'LOGIN we "ird user pw' would garble the
    # command (and, before aioimaplib 2.0.2, CR/LF in it would inject another).
    login = 'we "ird\\ user'
    rig.server.add_user(login, PASSWORD)
    source = rig.source(HEALTHY)
    source.rows.append(row("odd", "odd@rel.test", PASSWORD, rig.server.port, login=login))
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.idle(login)
        assert daemon.stats.get("auth_failures") == 0


async def test_a_short_password_does_not_mask_the_tls_error_it_happens_to_spell(
    rig: Rig,
) -> None:
    """The boundary rule end to end: the password ``WRONG`` against a server that does not
    speak TLS. OpenSSL's ``WRONG_VERSION_NUMBER`` stays readable (``********_VERSION_NUMBER``
    would tell the reader the password), and the operator is told once that this password
    is too short to mask safely."""
    short = "short@rel.test"
    rig.server.add_user(short, "WRONG")
    source = rig.source(HEALTHY)
    source.rows.append(row(short, short, "WRONG", rig.server.port))
    source.rows[-1]["imapSecurity"] = "tls"  # the test server speaks plain IMAP
    async with running_daemon(rig.settings(), source) as daemon:
        with trio.fail_after(10):
            await rig.idle(HEALTHY)
            (line,) = await rig.log(f"[idle/{short}] connect failed")
        last_error = rig.handle(daemon, short).memory.last_error
    assert "WRONG_VERSION_NUMBER" in line and last_error is not None
    assert "WRONG_VERSION_NUMBER" in last_error and "********" not in last_error
    (warning,) = rig.logs.matching("have a password shorter than 8 characters")
    assert short in warning
