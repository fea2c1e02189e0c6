"""``trio-idle oauth authorize`` driven by a real headless Chromium: the browser opens the
printed URL at the local OAuth server, follows its redirect to the command's one-shot
listener on 127.0.0.1, and the command exchanges the code (PKCE) and prints the refresh
token encrypted. Everything on loopback; Chromium runs with no proxy and its background
services off (tests/servers/chromium.py). A missing Chromium skips, or fails under
``TRIO_IDLE_REQUIRE_SERVERS=1``."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio_idle_testing.oauth_server import OAuthTestServer

from tests.oauth_cli import (
    CLIENT_ID,
    CLIENT_SECRET,
    KEY,
    URL_LINE,
    child_env,
    google_args,
    once,
    run_cli,
)
from tests.servers.chromium import dump_dom
from trio_idle.core.crypto import decrypt_password, derive_key


@pytest.mark.timeout(120)
async def test_sign_in_through_a_real_browser(nursery: trio.Nursery, chromium_bin: Path) -> None:
    server = OAuthTestServer(
        CLIENT_ID, CLIENT_SECRET, prefix="S3ntinel-", consent_user="u@example.test"
    )
    await nursery.start(server.serve)
    pages: list[str] = []

    async def open_in_chromium(url: str) -> None:
        pages.append(await dump_dom(chromium_bin, url))

    env = child_env(ENCRYPTION_KEY=KEY, TRIO_IDLE_GOOGLE_CLIENT_SECRET=CLIENT_SECRET)
    with trio.fail_after(90):
        run = await run_cli(google_args(server), env, once(open_in_chromium, URL_LINE))

    assert run.code == 0, run.stderr
    # the browser ended on the listener's page, after the provider's redirect
    assert "Signed in" in pages[0] and "close this window" in pages[0]
    (asked,) = server.authorization_requests()
    assert asked.form["code_challenge_method"] == "S256"
    (exchange,) = server.token_requests()
    assert exchange.form["grant_type"] == "authorization_code" and exchange.status == 200
    refresh = server.grant_of("u@example.test").refresh_token
    assert decrypt_password(run.stdout.strip(), derive_key(KEY)) == refresh
    assert refresh not in run.stderr and refresh not in pages[0]
