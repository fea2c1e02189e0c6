"""A server that quotes the OAuth2 access token back cannot make it reach the account
health report POSTed to the backend, ``/status`` (``last_error`` and the health
message), ``/metrics`` or a log line.

Real parts on loopback: the in-process daemon, our IMAP test server checking the tokens
(SASL XOAUTH2 / OAUTHBEARER), the test backend minting them on its token route and
receiving the health reports. The server ends the signed-in session with a ``BYE`` that
quotes the token, which the session and the health cell both turn into text: both must
mask it (they share one :class:`~trio_idle.accounts.outcome_text.ConnectionSecrets`).
"""

from __future__ import annotations

import itertools
import secrets
import time

import httpx
import trio
from trio_idle_testing.backend import Reply, ScanRequest

from tests.harness import ListSource, row, running_daemon
from tests.reliability.rig import Rig

A = "oauth-echo@rel.test"
STATUS_TOKEN = "status-token-for-the-token-leak-test"


class TokenRoute:
    """The backend's token route: a new recognisable token per request."""

    def __init__(self) -> None:
        self.issued: list[str] = []
        self._serial = itertools.count(1)

    def __call__(self, request: ScanRequest) -> Reply:
        token = f"S3ntinel-oauth-echo-{next(self._serial)}-{secrets.token_hex(8)}"
        self.issued.append(token)
        return Reply(json={"accessToken": token, "expiresAt": time.time() + 3600})


async def test_an_access_token_the_server_quotes_reaches_no_report_status_metric_or_log(
    rig: Rig,
) -> None:
    server, backend = rig.server, rig.backend
    tokens = TokenRoute()
    backend.token_reply = tokens
    server.add_user(A, "unused-password")
    server.oauth2_check = lambda user, token: token in tokens.issued
    oauth_row = {**row(A, A, "unused-password", server.port), "authType": "oauth2"}
    settings = rig.settings(
        TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0",
        TRIO_IDLE_STATUS_TOKEN=STATUS_TOKEN,
        TRIO_IDLE_UNREACHABLE_AFTER="1ms",  # a lost session is reported at once
        TRIO_IDLE_BACKOFF_INITIAL="1h",  # ... and stays lost while the test looks
        TRIO_IDLE_BACKOFF_MAX="1h",
    )
    async with running_daemon(settings, ListSource([oauth_row])) as daemon:
        with trio.fail_after(15):
            await rig.idle(A)
            await backend.wait_for_status(lambda: len(backend.status_for(A)) >= 1)
            (token,) = tokens.issued
            server.bye(A, f"session of token {token} revoked by the administrator")
            await backend.wait_for_status(
                lambda: any(r.body["state"] == "unreachable" for r in backend.status_for(A))
            )
            await rig.log(f"[idle/{A}] connection lost")
        url = daemon.supervisor.health_url if daemon.supervisor else None
        assert url is not None
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            bearer = {"authorization": f"Bearer {STATUS_TOKEN}"}
            status = await client.get("/status", headers=bearer)
            metrics = await client.get("/metrics")
    assert status.status_code == 200 and metrics.status_code == 200
    (conn,) = status.json()["connections"]
    lost = next(r for r in backend.status_for(A) if r.body["state"] == "unreachable")
    # the server's words arrive, with the token masked, at every reader
    for shown in (lost.body["message"], conn["last_error"], conn["health"]["message"]):
        assert "session of token ******** revoked by the administrator" in shown, shown
    assert 'account_health{reason="server_closed",state="unreachable"} 1.0' in metrics.text
    for text in (
        *(r.raw_body.decode() for r in backend.status_reports),
        *(r.raw_body.decode() for r in backend.requests),
        status.text,
        metrics.text,
        rig.logs.text(),
    ):
        assert token not in text
        assert token.partition("-echo-")[2] not in text  # not even its random part
    assert daemon.stats.get("internal_errors") == 0
