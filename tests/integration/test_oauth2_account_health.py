"""A user's OAuth2 grant is revoked and later restored: the backend hears
``auth_failed/token_revoked`` exactly once and ``ok`` exactly once again.

All real parts on loopback: Dovecot checks the access tokens itself (oauth2 passdb,
introspection at :class:`~trio_idle_testing.oauth_server.OAuthTestServer`), the daemon
refreshes the tokens at that server with the row's refresh token (daemon-side refresh, the
Google flavour by the e-mail domain), and the account health reports arrive at the test
backend's status route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from trio_idle_testing.backend import ScanBackend
from trio_idle_testing.oauth_server import OAuthTestServer

from tests.conftest import unavailable
from tests.harness import KEY, ListSource, make_settings, row, running_daemon
from tests.servers import ServerUnavailable
from tests.servers.dovecot import DovecotServer
from trio_idle.core.crypto import derive_key, encrypt_password

CLIENT_ID = "trio-idle-test-client"
CLIENT_SECRET = "oauth-cl1ent-s3cret-health"
CONN = "oauth-health-1"


@pytest.fixture
def oauth() -> OAuthTestServer:
    return OAuthTestServer(CLIENT_ID, CLIENT_SECRET, prefix="S3ntinel-at-health-")


@pytest.fixture
async def introspected_dovecot(
    oauth: OAuthTestServer, nursery: trio.Nursery
) -> AsyncIterator[DovecotServer]:
    await nursery.start(oauth.serve)
    try:
        server = DovecotServer(oauth2_introspection_url=oauth.introspection_url)
    except ServerUnavailable as exc:
        unavailable(str(exc))
    try:
        await trio.to_thread.run_sync(server.start)
        yield server
    finally:
        await trio.to_thread.run_sync(server.cleanup)


def health(backend: ScanBackend) -> list[tuple[str, str | None]]:
    return [
        (r.body["state"], r.body.get("reason")) for r in backend.status_for(CONN, accepted=True)
    ]


async def test_revoked_grant_is_reported_once_and_its_return_once(
    introspected_dovecot: DovecotServer, oauth: OAuthTestServer, backend: ScanBackend
) -> None:
    dovecot = introspected_dovecot
    user = dovecot.new_user("oh")
    grant = oauth.add_grant(user.email, refresh_token="S3ntinel-rt-health-grant")
    source = ListSource(
        [
            {
                **row(CONN, "health-user@gmail.com", "unused", dovecot.plain_port),
                "imapUser": user.email,  # the SASL user Dovecot's introspection names
                "authType": "oauth2",
                "encryptedRefreshToken": encrypt_password(grant.refresh_token, derive_key(KEY)),
            }
        ]
    )
    settings = make_settings(
        backend.url,
        TRIO_IDLE_IMAP_SECURITY="plain",
        TRIO_IDLE_GOOGLE_CLIENT_ID=CLIENT_ID,
        TRIO_IDLE_GOOGLE_CLIENT_SECRET=CLIENT_SECRET,
        TRIO_IDLE_GOOGLE_TOKEN_URL=oauth.token_url,
        TRIO_IDLE_AUTH_BACKOFF="300ms",
        TRIO_IDLE_AUTH_BACKOFF_MAX="600ms",
    )
    async with running_daemon(settings, source) as daemon:
        with trio.fail_after(20):
            await backend.wait_for_status(lambda: health(backend) == [("ok", None)])
            # the user withdraws consent in their Google account; the session is cut
            oauth.revoke(user.email)
            await trio.to_thread.run_sync(dovecot.kick, user.email)
            await backend.wait_for_status(lambda: len(health(backend)) >= 2)
            # several more refused attempts follow (auth backoff): still one report
            refreshes = len(oauth.token_requests())
            await oauth.wait_for(lambda: len(oauth.token_requests()) >= refreshes + 2)
            assert health(backend) == [("ok", None), ("auth_failed", "token_revoked")]
            # consent given again: the next attempt signs in, and the backend hears ok once
            grant.revoked = False
            await backend.wait_for_status(lambda: len(health(backend)) >= 3)
        assert daemon.stats.get("internal_errors") == 0
    assert health(backend) == [
        ("ok", None),
        ("auth_failed", "token_revoked"),
        ("ok", None),
    ]
    revoked = backend.status_for(CONN, accepted=True)[1].body
    assert revoked["email"] == "health-user@gmail.com" and revoked["attempts"] >= 1
    for report in backend.status_reports:
        text = str(report.body)
        assert "S3ntinel-rt" not in text and "S3ntinel-at" not in text
