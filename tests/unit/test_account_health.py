"""Account health, pure: the classifier, the debounce state machine, the report body, hints."""

from __future__ import annotations

import json
import socket
import ssl

import pytest
import trio
import trio.testing

from tests.fixtures import mail_connection
from trio_idle.accounts.credentials import (
    TOKEN_ERROR,
    TOKEN_REVOKED,
    TOKEN_UNAVAILABLE,
    TokenUnavailable,
)
from trio_idle.accounts.outcome_text import ConnectionSecrets, Failure
from trio_idle.accounts.providers import GENERIC_PRESET, preset_named
from trio_idle.core.errors import ConnectionLost, ImapAuthError, ImapConnectError, ImapError
from trio_idle.imap.connect import connect_error_kind
from trio_idle.mailbox.account_health import (
    AUTH_REASONS,
    HINTS,
    UNREACHABLE_REASONS,
    Connected,
    Health,
    HealthTracker,
    classify,
    explain,
    hint,
)
from trio_idle.mailbox.health_reporter import LatestValue, report_body

PASSWORD = "S3ntinel-pw-health-unit"
GMX = preset_named("gmx")


SECRETS = ConnectionSecrets([PASSWORD])


def failed(error: BaseException) -> Failure:
    """``error`` as a session hands it to the health: text made by the secret set."""
    return SECRETS.failure(error)


def auth(text: str, **kw: object) -> Health | None:
    return classify(failed(ImapAuthError(text)), GENERIC_PRESET, **kw)  # type: ignore[arg-type]


# -- classifier --------------------------------------------------------------------------


def test_a_session_in_idle_is_ok_and_a_polled_one_degraded() -> None:
    assert classify(Connected(idle=True), GENERIC_PRESET) == Health("ok")
    polled = classify(Connected(idle=False), GENERIC_PRESET)
    assert polled is not None and (polled.state, polled.reason) == ("degraded", "no_idle")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "login rejected for a: NO [AUTHENTICATIONFAILED] Authentication failed.",
            "invalid_credentials",
        ),
        ("login rejected for a: NO [LIMIT] Too many connections", "too_many_connections"),
        ("login rejected for a: NO [CONTACTADMIN] account disabled", "account_locked"),
        ("login rejected for a: NO login refused", "unknown"),
    ],
)
def test_refused_logins_are_classified_by_their_response_code(text: str, reason: str) -> None:
    health = auth(text)
    assert health is not None and health.key == ("auth_failed", reason)
    assert health.message == text


def test_an_oauth2_refusal_is_a_refused_token() -> None:
    refused = auth("NO [AUTHENTICATIONFAILED] Invalid credentials", oauth=True)
    assert refused is not None and refused.key == ("auth_failed", "token_invalid")
    refusal = ImapAuthError("AUTHENTICATE failed", sasl_status="401")
    gmail = classify(failed(refusal), GENERIC_PRESET, oauth=True)
    assert gmail is not None and gmail.reason == "token_invalid"


def test_the_message_is_the_server_text_scrubbed_and_short() -> None:
    error = ImapAuthError("ours", server_text=f"NO [ALERT] your password {PASSWORD} is wrong " * 20)
    health = classify(failed(error), GENERIC_PRESET)
    assert health is not None
    assert PASSWORD not in health.message
    assert health.message.startswith("NO [ALERT] your password ******** is wrong")
    assert len(health.message) <= 200


@pytest.mark.parametrize("kind", UNREACHABLE_REASONS)
def test_connect_failures_are_unreachable_with_their_kind(kind: str) -> None:
    health = classify(failed(ImapConnectError("cannot connect", kind=kind)), GENERIC_PRESET)
    assert health is not None and health.key == ("unreachable", kind)


def test_a_lost_connection_without_a_kind_counts_as_closed_by_the_server() -> None:
    for error in (ConnectionLost("BYE"), ImapError("SELECT INBOX failed: NO")):
        health = classify(failed(error), GENERIC_PRESET)
        assert health is not None and health.key == ("unreachable", "server_closed")
    silent = ConnectionLost("no answer to NOOP within 5s", kind="timeout")
    half_open = classify(failed(silent), GENERIC_PRESET)
    assert half_open is not None and half_open.reason == "timeout"


def test_token_outcomes() -> None:
    for reason in (TOKEN_REVOKED, TOKEN_UNAVAILABLE):
        health = classify(failed(TokenUnavailable(reason, "no grant")), GENERIC_PRESET)
        assert health is not None and health.key == ("auth_failed", reason)
    # a token source failing for now says nothing about the account
    assert classify(failed(TokenUnavailable(TOKEN_ERROR, "backend 503")), GENERIC_PRESET) is None
    assert classify(failed(RuntimeError("a bug")), GENERIC_PRESET) is None


def test_connect_error_kinds_from_the_os_errors() -> None:
    assert connect_error_kind(socket.gaierror(socket.EAI_NONAME, "x")) == "dns"
    assert connect_error_kind(ConnectionRefusedError()) == "refused"
    assert connect_error_kind(ssl.SSLCertVerificationError("bad cert")) == "tls"
    assert connect_error_kind(TimeoutError()) == "timeout"
    assert connect_error_kind(ConnectionResetError()) == "server_closed"


def test_every_reason_has_a_hint_naming_the_provider_where_it_matters() -> None:
    for reason in (*AUTH_REASONS, *UNREACHABLE_REASONS, "no_idle", None):
        assert hint(reason)
    assert set(AUTH_REASONS) | set(UNREACHABLE_REASONS) <= set(HINTS)
    assert hint("imap_disabled", GMX.title) == "enable IMAP in the GMX settings"
    assert "app password" in hint("app_password_required")
    assert "reconnect the account in the app" in hint("token_revoked")


def test_explain_puts_the_health_and_its_hint_after_the_text() -> None:
    refused = ImapAuthError(f"login rejected: NO [AUTHENTICATIONFAILED] {PASSWORD}")
    text = explain(failed(refused), GMX)
    assert PASSWORD not in text
    assert text.endswith("— auth_failed/invalid_credentials: " + hint("invalid_credentials"))


# -- state machine ------------------------------------------------------------------------

AUTH = Health("auth_failed", "invalid_credentials", "NO")
DOWN = Health("unreachable", "refused", "refused")
TIMEOUT = Health("unreachable", "timeout", "no greeting")
OK = Health("ok")


def deliver_due(tracker: HealthTracker, now: float) -> Health | None:
    report = tracker.due(now)
    if report is None:
        return None
    tracker.delivered(report)
    return report.health


def test_first_state_and_auth_failures_and_recoveries_are_due_at_once() -> None:
    t = HealthTracker(unreachable_after=600)
    assert t.due(0) is None  # nothing observed yet
    t.observe(OK, 0, 1000)
    assert deliver_due(t, 0) == OK
    t.observe(AUTH, 10, 1010)
    report = t.due(10)
    assert report is not None and (report.health, report.since, report.attempts) == (AUTH, 1010, 1)
    t.delivered(report)
    t.observe(AUTH, 20, 1020)
    t.observe(AUTH, 30, 1030)
    assert t.due(30) is None  # the same failure again: no second report
    assert t.attempts == 3 and t.since_wall == 1010
    t.observe(OK, 40, 1040)
    assert deliver_due(t, 40) == OK
    assert t.attempts == 0


def test_unreachable_is_reported_only_once_it_has_lasted() -> None:
    t = HealthTracker(unreachable_after=600)
    t.observe(OK, 0, 0)
    deliver_due(t, 0)
    t.observe(DOWN, 100, 100)
    assert t.due(100) is None and t.next_due() == 700
    t.observe(TIMEOUT, 400, 400)  # another network reason: the outage still began at 100
    assert t.due(699.9) is None and t.next_due() == 700
    report = t.due(700)
    assert report is not None
    assert (report.health, report.since, report.attempts) == (TIMEOUT, 100, 2)
    t.delivered(report)
    assert t.next_due() is None
    t.observe(OK, 800, 800)
    assert deliver_due(t, 800) == OK


def test_a_short_outage_pages_nobody() -> None:
    t = HealthTracker(unreachable_after=600)
    t.observe(OK, 0, 0)
    deliver_due(t, 0)
    t.observe(DOWN, 100, 100)
    t.observe(OK, 130, 130)  # the server restarted
    assert t.due(10_000) is None and t.next_due() is None
    # a new outage is timed from its own start
    t.observe(DOWN, 200, 200)
    assert t.due(799) is None and t.next_due() == 800


def test_an_auth_failure_during_an_outage_is_reported_at_once() -> None:
    t = HealthTracker(unreachable_after=600)
    t.observe(DOWN, 0, 0)
    assert t.due(1) is None
    t.observe(AUTH, 5, 5)
    assert deliver_due(t, 5) == AUTH


def test_nothing_observed_changes_nothing() -> None:
    t = HealthTracker(unreachable_after=600)
    t.observe(None, 0, 0)
    assert t.current is None and t.version == 0


# -- report body, cell ----------------------------------------------------------------------


def test_report_body_carries_the_contract_fields() -> None:
    conn = mail_connection(email="a@x.test", host="imap.x.test", login="a", password=PASSWORD)
    t = HealthTracker(unreachable_after=600)
    t.observe(AUTH, 0, 1_764_626_785.25)
    report = t.due(0)
    assert report is not None
    body = report_body(conn, report)
    assert json.loads(body) == {
        "connectionId": "c1",
        "userId": "u1",
        "email": "a@x.test",
        "state": "auth_failed",
        "reason": "invalid_credentials",
        "message": "NO",
        "since": "2025-12-01T22:06:25.250Z",
        "attempts": 1,
    }
    assert PASSWORD.encode() not in body


async def test_latest_value_keeps_only_the_newest_and_wakes_a_waiter() -> None:
    cell: LatestValue[int] = LatestValue(0)
    cell.set(1)
    cell.set(2)
    assert cell.get() == 2 and cell.version == 2
    assert await cell.wait_newer(0) == 2  # already newer: no wait
    async with trio.open_nursery() as nursery:
        seen: list[int] = []

        async def waiter() -> None:
            seen.append(await cell.wait_newer(2))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        cell.set(3)
    assert seen == [3]
    # a deadline ends the wait without a newer value
    assert await cell.wait_newer(3, trio.current_time()) == 3
