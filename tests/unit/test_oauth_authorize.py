"""``trio-idle oauth authorize`` end to end against the local OAuth server
(:class:`~trio_idle_testing.oauth_server.OAuthTestServer`): authorization code with PKCE
through a loopback redirect, the device code flow, and what comes out (the encrypted
token, the connections file entry, the clear token only when asked). The "browser" here
is httpx following the redirect; tests/integration/test_oauth_browser.py drives a real
headless Chromium. Everything on 127.0.0.1.
"""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
from trio_idle_testing.oauth_server import Fault, OAuthTestServer

from tests.oauth_cli import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEVICE_LINE,
    KEY,
    URL_LINE,
    Console,
    browse,
    child_env,
    google_args,
    microsoft_device_args,
    once,
    run_cli,
)
from trio_idle.accounts.connections import MailConnection, build_connection
from trio_idle.accounts.source_file import FileSource
from trio_idle.cli import build_parser, settings_from_args
from trio_idle.core.crypto import decrypt_password, derive_key
from trio_idle.oauth_commands import authorize, authorize_options, required_settings

USER = "mailbox-user@example.test"


@pytest.fixture
async def google(nursery: trio.Nursery) -> AsyncIterator[OAuthTestServer]:
    server = OAuthTestServer(CLIENT_ID, CLIENT_SECRET, prefix="S3ntinel-", consent_user=USER)
    await nursery.start(server.serve)
    yield server


@pytest.fixture
async def microsoft(nursery: trio.Nursery) -> AsyncIterator[OAuthTestServer]:
    # a public client: no secret, and the command must send none
    server = OAuthTestServer(CLIENT_ID, None, prefix="S3ntinel-", device_interval=1)
    await nursery.start(server.serve)
    yield server


def _secrets_of(server: OAuthTestServer) -> list[str]:
    """Everything the run must never print: tokens, codes, the PKCE verifier, the client
    secret."""
    found = [CLIENT_SECRET, *server.grants, *server.issued, *server.codes, *server.devices]
    found += [r.form.get("code_verifier", "") for r in server.token_requests()]
    return [s for s in found if s]


def _assert_nothing_secret_in(text: str, server: OAuthTestServer) -> None:
    for secret in _secrets_of(server):
        assert secret not in text


def _refresh_token(server: OAuthTestServer, user: str = USER) -> str:
    return server.grant_of(user).refresh_token


# ------------------------------------------------------------ the CLI, as a process


async def test_google_sign_in_prints_the_refresh_token_encrypted(
    google: OAuthTestServer,
) -> None:
    pages = []

    async def open_in_browser(url: str) -> None:
        pages.append(await browse(url))

    env = child_env(ENCRYPTION_KEY=KEY, TRIO_IDLE_GOOGLE_CLIENT_SECRET=CLIENT_SECRET)
    with trio.fail_after(30):
        run = await run_cli(google_args(google), env, once(open_in_browser, URL_LINE))

    assert run.code == 0, run.stderr
    assert pages[0].status_code == 200 and "Signed in" in pages[0].text
    # the one line on stdout is the stored-credential format, and it is this user's token
    token = run.stdout.strip()
    assert len(token.splitlines()) == 1 and token.count(":") == 2
    assert decrypt_password(token, derive_key(KEY)) == _refresh_token(google)
    # PKCE and the loopback redirect, as the provider saw them
    (asked,) = google.authorization_requests()
    assert asked.form["code_challenge_method"] == "S256"
    assert asked.form["redirect_uri"].startswith("http://127.0.0.1:")
    assert asked.form["access_type"] == "offline" and asked.form["prompt"] == "consent"
    (exchange,) = google.token_requests()
    assert exchange.form["grant_type"] == "authorization_code"
    assert exchange.form["redirect_uri"] == asked.form["redirect_uri"]
    assert exchange.status == 200
    _assert_nothing_secret_in(run.stdout.replace(token, "") + run.stderr, google)


async def test_entry_gets_the_encrypted_token_and_the_daemon_reads_it(
    google: OAuthTestServer, tmp_path: Path
) -> None:
    path = tmp_path / "connections.toml"
    original = (
        "# office mailboxes\n"
        "[[connection]]\n"
        'id = "alice"\n'
        f'email = "{USER}"\n'
        'imap_host = "127.0.0.1"\n'
        'auth = "oauth2"   # signed up with trio-idle oauth authorize\n'
        "\n"
        "[[connection]]\n"
        'id = "bob"\n'
        'email = "bob@example.test"\n'
        'imap_host = "127.0.0.1"\n'
        'password_env = "BOB_PW"\n'
    )
    path.write_text(original)

    async def open_in_browser(url: str) -> None:
        await browse(url)

    env = child_env(
        ENCRYPTION_KEY=KEY,
        TRIO_IDLE_GOOGLE_CLIENT_SECRET=CLIENT_SECRET,
        TRIO_IDLE_CONNECTIONS_FILE=str(path),
    )
    with trio.fail_after(30):
        run = await run_cli(
            google_args(google, "--entry", "alice"), env, once(open_in_browser, URL_LINE)
        )

    assert run.code == 0, run.stderr
    assert run.stdout == ""
    assert '"alice"' in run.stderr and str(path) in run.stderr
    written = path.read_text()
    # one line added, every other byte as it was
    token = tomllib.loads(written)["connection"][0]["encrypted_refresh_token"]
    assert written == original.replace(
        "oauth authorize\n\n", f'oauth authorize\nencrypted_refresh_token = "{token}"\n\n'
    )
    # what the daemon's file source makes of it
    rows = await FileSource(str(path), {"BOB_PW": "x"}).fetch()
    alice = build_connection(rows[0], derive_key(KEY))
    assert isinstance(alice, MailConnection)
    assert alice.refresh_token is not None
    assert alice.refresh_token.reveal() == _refresh_token(google)
    _assert_nothing_secret_in(run.stdout + run.stderr + written, google)


async def test_show_token_prints_it_in_clear_with_a_warning_and_needs_no_key(
    google: OAuthTestServer,
) -> None:
    async def open_in_browser(url: str) -> None:
        await browse(url)

    env = child_env(TRIO_IDLE_GOOGLE_CLIENT_SECRET=CLIENT_SECRET)
    with trio.fail_after(30):
        run = await run_cli(
            google_args(google, "--show-token"), env, once(open_in_browser, URL_LINE)
        )
    assert run.code == 0, run.stderr
    assert run.stdout.strip() == _refresh_token(google)
    assert "WARNING" in run.stderr and "clear text" in run.stderr
    _assert_nothing_secret_in(run.stderr, google)


async def test_microsoft_device_code_sign_in(microsoft: OAuthTestServer) -> None:
    async def user_signs_in(user_code: str) -> None:
        # the user enters the code once the command is already polling
        await microsoft.wait_for(lambda: any(d.polls >= 1 for d in microsoft.devices.values()))
        assert any(d.user_code == user_code for d in microsoft.devices.values())
        microsoft.approve_device(USER)

    env = child_env(ENCRYPTION_KEY=KEY)
    with trio.fail_after(30):
        run = await run_cli(microsoft_device_args(microsoft), env, once(user_signs_in, DEVICE_LINE))

    assert run.code == 0, run.stderr
    assert f"{microsoft.url}/device" in run.stderr
    assert decrypt_password(run.stdout.strip(), derive_key(KEY)) == _refresh_token(microsoft)
    polls = microsoft.token_requests()
    assert [r.status for r in polls] == [400, 200]  # authorization_pending, then the tokens
    assert all("client_secret" not in r.form for r in polls)  # public client
    _assert_nothing_secret_in(run.stderr, microsoft)


# --------------------------------------------------- in-process: failures and details


def _options(server: OAuthTestServer, args: list[str], **env: str):  # type: ignore[no-untyped-def]
    parsed = build_parser().parse_args(args)
    base = {"ENCRYPTION_KEY": KEY, "TRIO_IDLE_GOOGLE_CLIENT_SECRET": CLIENT_SECRET, **env}
    settings = settings_from_args(
        parsed, base, require=required_settings(parsed), require_source=False
    )
    return authorize_options(parsed, settings)


async def _sign_in(
    server: OAuthTestServer,
    args: list[str],
    browser: Callable[[Console], Awaitable[None]],
    **env: str,
) -> tuple[int, str, str]:
    """Run the command in this process; ``browser(console)`` plays the user."""
    options = _options(server, args, **env)
    out, err = Console(), Console()
    result: list[int] = []

    async def command() -> None:
        result.append(await authorize(options, key=derive_key(KEY), out=out, err=err))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(command)
            await err.shown.wait()
            await browser(err)
    return result[0], out.getvalue(), err.getvalue()


async def test_stray_requests_to_the_listener_do_not_end_the_sign_in(
    google: OAuthTestServer,
) -> None:
    async def browser(console: Console) -> None:
        assert console.url is not None
        page = await browse(console.url, before=["/favicon.ico", "/callback"])
        assert page.status_code == 200

    code, out, err = await _sign_in(google, google_args(google), browser)
    assert code == 0, err
    assert decrypt_password(out.strip(), derive_key(KEY)) == _refresh_token(google)


async def test_a_redirect_with_another_state_is_refused_and_nothing_exchanged(
    google: OAuthTestServer,
) -> None:
    google.tamper_state = True  # a forged redirect, e.g. from a page that guessed the port
    pages = []

    async def browser(console: Console) -> None:
        assert console.url is not None
        pages.append(await browse(console.url))

    code, out, err = await _sign_in(google, google_args(google), browser)
    assert code == 1
    assert out == ""
    assert "state" in err and "nothing was exchanged" in err
    assert pages[0].status_code == 400 and "Sign-in failed" in pages[0].text
    assert google.token_requests() == []  # the code was never traded
    assert google.grants == {}


async def test_user_who_declines_gets_the_providers_reason(google: OAuthTestServer) -> None:
    google.deny_consent = True

    async def browser(console: Console) -> None:
        assert console.url is not None
        await browse(console.url)

    code, out, err = await _sign_in(google, google_args(google), browser)
    assert (code, out) == (1, "")
    assert "access_denied" in err and "The user said no." in err
    assert google.token_requests() == []


async def test_token_endpoint_refusal_is_one_scrubbed_line(google: OAuthTestServer) -> None:
    # the provider echoes the client secret back (some do, in error descriptions)
    google.fail_next(
        Fault(
            status=400,
            json={"error": "invalid_client", "error_description": f"bad {CLIENT_SECRET}\nx"},
        )
    )

    async def browser(console: Console) -> None:
        assert console.url is not None
        await browse(console.url)

    code, out, err = await _sign_in(google, google_args(google), browser)
    assert (code, out) == (1, "")
    last = err.strip().splitlines()[-1]
    assert "invalid_client" in last and "TRIO_IDLE_GOOGLE_CLIENT_ID" in last
    assert CLIENT_SECRET not in err


async def test_device_code_user_who_declines(microsoft: OAuthTestServer) -> None:
    async def browser(console: Console) -> None:
        assert console.user_code is not None
        await microsoft.wait_for(lambda: len(microsoft.token_requests()) >= 1)
        microsoft.deny_device()

    code, out, err = await _sign_in(microsoft, microsoft_device_args(microsoft), browser)
    assert (code, out) == (1, "")
    assert "declined" in err


async def test_no_redirect_in_time(google: OAuthTestServer) -> None:
    async def browser(console: Console) -> None:
        pass  # the user never opens the URL

    code, out, err = await _sign_in(google, google_args(google, "--wait", "1s"), browser)
    assert (code, out) == (1, "")
    assert "no redirect from the browser within 1s" in err
