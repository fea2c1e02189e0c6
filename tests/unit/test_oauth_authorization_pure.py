"""The pure parts of ``trio-idle oauth authorize`` (trio_idle/auth/authorization.py): PKCE,
state, the authorization URL, the redirect's judgement, the token request bodies, the
device authorization reply and the polling schedule. No sockets."""

from __future__ import annotations

import json
import urllib.parse

import pytest
import trio
import trio.testing

from trio_idle.accounts.providers import GOOGLE_SCOPE, MICROSOFT_SCOPE, oauth_endpoints
from trio_idle.auth.authorization import (
    DEVICE_GRANT_TYPE,
    MAX_INTERVAL,
    MIN_INTERVAL,
    PENDING,
    SLOW_DOWN,
    TRANSIENT,
    CallbackCode,
    CallbackRefused,
    NotTheCallback,
    PollAgain,
    PollOutcome,
    PollSchedule,
    SignInClient,
    SignInFailed,
    authorization_url,
    check_endpoint_url,
    classify_poll_reply,
    code_challenge,
    code_exchange_body,
    device_poll_body,
    new_flow,
    parse_callback,
    parse_device_authorization,
    poll_device,
    refresh_token_of,
)
from trio_idle.auth.oauth_provider import TokenGrant, parse_token_reply
from trio_idle.core.scrub import Scrubber
from trio_idle.core.secret import Secret

CLIENT_SECRET = "oauth-cl1ent-s3cret-pure"


def _client(secret: str | None = CLIENT_SECRET) -> SignInClient:
    return SignInClient(
        provider="google",
        client_id="cid.apps.example",
        client_secret=Secret(secret) if secret is not None else None,
        authorization_url="https://accounts.example/o/auth?hd=example.com",
        token_url="https://oauth.example/token",
        device_url=None,
        scope=GOOGLE_SCOPE,
        extra=(("access_type", "offline"), ("prompt", "consent")),
    )


def _form(body: bytes) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(body.decode("ascii")))


# ------------------------------------------------------------------------- PKCE, state


def test_code_challenge_is_rfc7636_s256() -> None:
    # RFC 7636 Appendix B
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_each_flow_has_fresh_verifier_and_state_of_the_rfc_shape() -> None:
    flows = [new_flow() for _ in range(50)]
    verifiers = {f.verifier.reveal() for f in flows}
    states = {f.state.reveal() for f in flows}
    assert len(verifiers) == len(states) == 50
    for flow in flows:
        verifier = flow.verifier.reveal()
        assert len(verifier) == 43  # RFC 7636 4.1: 43..128 unreserved characters
        assert all(c.isalnum() or c in "-._~" for c in verifier)
        assert len(flow.state.reveal()) == 32
    assert "verifier=********" in repr(flows[0])
    assert flows[0].verifier.reveal() not in repr(flows[0])


def test_authorization_url_carries_pkce_state_scope_and_keeps_the_base_query() -> None:
    flow = new_flow()
    url = authorization_url(_client(), "http://127.0.0.1:4711", flow)
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "accounts.example", "/o/auth")
    query = urllib.parse.parse_qs(parts.query)
    assert query["hd"] == ["example.com"]
    assert query["response_type"] == ["code"]
    assert query["client_id"] == ["cid.apps.example"]
    assert query["redirect_uri"] == ["http://127.0.0.1:4711"]
    assert query["scope"] == [GOOGLE_SCOPE]
    assert query["state"] == [flow.state.reveal()]
    assert query["code_challenge"] == [code_challenge(flow.verifier.reveal())]
    assert query["code_challenge_method"] == ["S256"]
    assert query["access_type"] == ["offline"] and query["prompt"] == ["consent"]
    # the verifier itself never leaves the machine before the token request
    assert flow.verifier.reveal() not in url
    assert CLIENT_SECRET not in url


def test_presets_name_the_scopes_the_docs_ask_for() -> None:
    google, microsoft = oauth_endpoints("google"), oauth_endpoints("microsoft")
    assert google is not None and microsoft is not None
    assert google.scope == "https://mail.google.com/"
    assert microsoft.scope == "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
    assert microsoft.scope == MICROSOFT_SCOPE
    assert google.device_url is None and microsoft.device_url is not None
    assert oauth_endpoints("yahoo") is None


# ------------------------------------------------------------------------- the redirect


def _target(**params: str) -> str:
    return "/?" + urllib.parse.urlencode(params)


def test_callback_with_this_state_gives_the_code() -> None:
    flow = new_flow()
    judged = parse_callback(_target(code="the-code", state=flow.state.reveal()), flow)
    assert isinstance(judged, CallbackCode)
    assert judged.code.reveal() == "the-code"
    assert "the-code" not in repr(judged)


@pytest.mark.parametrize(
    "params",
    [
        {"code": "the-code", "state": "someone-elses-state"},
        {"code": "the-code"},
        # an attacker cannot end the sign-in with an error either
        {"error": "access_denied"},
        {"error": "access_denied", "state": "wrong"},
    ],
)
def test_callback_without_this_state_is_refused_whatever_it_says(params: dict[str, str]) -> None:
    flow = new_flow()
    judged = parse_callback(_target(**params), flow)
    assert isinstance(judged, CallbackRefused)
    assert "state" in judged.message
    assert "the-code" not in judged.message


def test_callback_with_two_states_is_refused() -> None:
    flow = new_flow()
    state = flow.state.reveal()
    judged = parse_callback(f"/?code=c&state={state}&state={state}", flow)
    assert isinstance(judged, CallbackRefused)


def test_provider_error_is_reported_scrubbed() -> None:
    flow = new_flow()
    scrubber = Scrubber([CLIENT_SECRET])
    judged = parse_callback(
        _target(
            state=flow.state.reveal(),
            error="access_denied",
            error_description=f"no\r\nFAKE LOG LINE {CLIENT_SECRET}",
        ),
        flow,
        scrubber=scrubber,
    )
    assert isinstance(judged, CallbackRefused)
    assert "access_denied" in judged.message
    assert CLIENT_SECRET not in judged.message
    assert "\n" not in judged.message and "\r" not in judged.message


def test_callback_without_code_is_refused_and_other_paths_are_not_the_callback() -> None:
    flow = new_flow()
    assert isinstance(parse_callback(_target(state=flow.state.reveal()), flow), CallbackRefused)
    assert isinstance(
        parse_callback(_target(state=flow.state.reveal(), code=""), flow), CallbackRefused
    )
    assert isinstance(parse_callback("/favicon.ico", flow), NotTheCallback)
    assert isinstance(parse_callback("/callback?code=x", flow), NotTheCallback)


def test_code_exchange_sends_verifier_redirect_and_client() -> None:
    flow = new_flow()
    body = _form(code_exchange_body(_client(), Secret("the-code"), "http://127.0.0.1:9", flow))
    assert body == {
        "grant_type": "authorization_code",
        "code": "the-code",
        "redirect_uri": "http://127.0.0.1:9",
        "code_verifier": flow.verifier.reveal(),
        "client_id": "cid.apps.example",
        "client_secret": CLIENT_SECRET,
    }
    public = _form(code_exchange_body(_client(None), Secret("c"), "http://127.0.0.1:9", flow))
    assert "client_secret" not in public


def test_refresh_token_of_requires_one() -> None:
    assert refresh_token_of("g", TokenGrant(Secret("at"), 60, Secret("rt"))).reveal() == "rt"
    with pytest.raises(SignInFailed, match="no refresh token"):
        refresh_token_of("g", TokenGrant(Secret("at"), 60, None))
    refused = parse_token_reply("google", 400, {}, b'{"error": "invalid_grant"}')
    with pytest.raises(SignInFailed, match="invalid_grant"):
        refresh_token_of("google", refused)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://login.example/authorize", True),
        ("http://127.0.0.1:8080/token", True),
        ("http://[::1]:8080/token", True),
        ("http://localhost/token", True),
        ("http://oauth.example/token", False),
        ("https://user:pw@oauth.example/token", False),
        ("ftp://oauth.example/", False),
        ("https://oauth.example/token#x", False),
        ("not a url", False),
        ("http://127.0.0.1:99999/", False),
    ],
)
def test_endpoint_urls_must_be_https_or_loopback(url: str, ok: bool) -> None:
    if ok:
        assert check_endpoint_url(url) == url
    else:
        with pytest.raises(ValueError):
            check_endpoint_url(url)


# ------------------------------------------------------------------- device authorization


def _device_reply(**fields: object) -> bytes:
    base: dict[str, object] = {
        "device_code": "dev-code-secret",
        "user_code": "ABCD-EFGH",
        "verification_uri": "https://microsoft.com/devicelogin",
        "expires_in": 900,
        "interval": 5,
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_device_authorization_is_parsed_and_its_times_bounded() -> None:
    device = parse_device_authorization("microsoft", 200, _device_reply())
    assert (device.user_code, device.verification_uri) == (
        "ABCD-EFGH",
        "https://microsoft.com/devicelogin",
    )
    assert (device.expires_in, device.interval) == (900.0, 5.0)
    assert "dev-code-secret" not in repr(device)
    hammer = parse_device_authorization("microsoft", 200, _device_reply(interval=0))
    assert hammer.interval == MIN_INTERVAL
    sleepy = parse_device_authorization("microsoft", 200, _device_reply(interval=10**9))
    assert sleepy.interval == MAX_INTERVAL
    default = parse_device_authorization("microsoft", 200, _device_reply(interval=None))
    assert default.interval == 5.0
    older = _device_reply(verification_uri=None, verification_url="https://example/device")
    assert parse_device_authorization("m", 200, older).verification_uri == "https://example/device"


@pytest.mark.parametrize(
    "fields",
    [
        {"verification_uri": "http://phish.example/device"},
        {"verification_uri": "javascript:alert(1)"},
        {"user_code": "ABCD\x1b[2J"},
        {"device_code": ""},
        {"interval": "soon"},
    ],
)
def test_unusable_device_authorization_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(SignInFailed):
        parse_device_authorization("microsoft", 200, _device_reply(**fields))


def test_device_authorization_error_is_scrubbed() -> None:
    body = json.dumps(
        {"error": "invalid_client", "error_description": f"AADSTS7000215 {CLIENT_SECRET}\n"}
    ).encode()
    with pytest.raises(SignInFailed) as caught:
        parse_device_authorization("microsoft", 401, body, scrubber=Scrubber([CLIENT_SECRET]))
    text = str(caught.value)
    assert "invalid_client" in text and CLIENT_SECRET not in text and "\n" not in text


def test_device_poll_body() -> None:
    device = parse_device_authorization("microsoft", 200, _device_reply())
    assert _form(device_poll_body(_client(None), device)) == {
        "grant_type": DEVICE_GRANT_TYPE,
        "device_code": "dev-code-secret",
        "client_id": "cid.apps.example",
    }


@pytest.mark.parametrize(
    ("status", "reply", "expected"),
    [
        (400, {"error": "authorization_pending"}, PollAgain(PENDING)),
        (400, {"error": "slow_down"}, PollAgain(SLOW_DOWN)),
        (503, {"error": "temporarily_unavailable"}, PollAgain(TRANSIENT)),
        (429, {}, PollAgain(TRANSIENT)),
    ],
)
def test_poll_replies_that_mean_again(status: int, reply: object, expected: PollAgain) -> None:
    outcome = classify_poll_reply("microsoft", status, {}, json.dumps(reply).encode())
    assert outcome == expected


@pytest.mark.parametrize(
    ("error", "said"),
    [
        ("access_denied", "declined"),
        ("authorization_declined", "declined"),
        ("expired_token", "expired"),
        ("invalid_grant", "invalid_grant"),
    ],
)
def test_poll_replies_that_end_the_sign_in(error: str, said: str) -> None:
    outcome = classify_poll_reply("microsoft", 400, {}, json.dumps({"error": error}).encode())
    assert isinstance(outcome, SignInFailed)
    assert said in str(outcome)


def test_poll_reply_with_tokens_is_the_grant() -> None:
    reply = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}
    outcome = classify_poll_reply("microsoft", 200, {}, json.dumps(reply).encode())
    assert isinstance(outcome, TokenGrant)
    assert outcome.refresh_token == Secret("rt")


def test_poll_schedule_slow_down_adds_five_seconds_for_good() -> None:
    schedule = PollSchedule(interval=5.0, expires_at=1000.0)
    assert schedule.after(PENDING) == schedule
    slower = schedule.after(SLOW_DOWN)
    assert slower.interval == 10.0
    assert slower.after(PENDING).interval == 10.0  # stays slower
    assert slower.after(SLOW_DOWN).interval == 15.0
    assert PollSchedule(40.0, 1000.0).after(TRANSIENT).interval == MAX_INTERVAL
    assert schedule.next_poll(100.0) == 105.0
    assert schedule.next_poll(996.0) is None  # the code is dead by then


async def test_poll_device_follows_the_schedule_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    replies: list[PollOutcome] = [
        PollAgain(PENDING),
        PollAgain(SLOW_DOWN),
        PollAgain(PENDING),
        TokenGrant(Secret("at"), 60, Secret("rt")),
    ]
    polled_at: list[float] = []
    start = trio.current_time()

    async def poll() -> PollOutcome:
        polled_at.append(trio.current_time() - start)
        return replies.pop(0)

    grant = await poll_device(poll, PollSchedule(5.0, start + 900))
    assert grant.refresh_token == Secret("rt")
    # first poll after one interval; slow_down makes every later gap 10 s
    assert polled_at == pytest.approx([5.0, 10.0, 20.0, 30.0])


async def test_poll_device_stops_at_expiry(autojump_clock: trio.testing.MockClock) -> None:
    polls = 0

    async def poll() -> PollOutcome:
        nonlocal polls
        polls += 1
        return PollAgain(PENDING)

    start = trio.current_time()
    with pytest.raises(SignInFailed, match="expired"):
        await poll_device(poll, PollSchedule(5.0, start + 23))
    assert polls == 4  # at 5, 10, 15, 20; 25 would be past expiry
