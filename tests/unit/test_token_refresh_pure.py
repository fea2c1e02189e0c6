"""The daemon's own OAuth2 refresh, pure parts: provider choice, request body, reply
judgement, fingerprints, settings and statements (no sockets)."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from trio_idle.accounts.credentials import TOKEN_ERROR, TOKEN_REVOKED, TokenUnavailable
from trio_idle.accounts.providers import MICROSOFT_SCOPE
from trio_idle.auth.oauth_provider import (
    DEFAULT_EXPIRES_IN,
    MAX_EXPIRES_IN,
    TokenGrant,
    parse_token_reply,
    provider_clients,
    provider_for,
    refresh_body,
)
from trio_idle.auth.rotation import fingerprint, fingerprint_key
from trio_idle.core.config import ConfigError, OAuthSettings, Settings, parse_settings
from trio_idle.core.scrub import PLAIN, Scrubber, Scrubs
from trio_idle.core.secret import Secret
from trio_idle.state.tables import POSTGRES_MIGRATIONS, POSTGRES_TOKEN_SQL, SQLITE_TOKEN_SQL

CLIENT_SECRET = "oauth-cl1ent-s3cret-pure"
REFRESH = "S3ntinel-rt-pure-0123456789"
ACCESS = "S3ntinel-at-pure-ya29.abcdef"


def reply(
    status: int,
    payload: object,
    headers: dict[str, str] | None = None,
    scrubber: Scrubs = PLAIN,
) -> TokenGrant | TokenUnavailable:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_token_reply("google", status, headers or {}, body, scrubber=scrubber, now=1000.0)


@pytest.mark.parametrize(
    ("provider", "email", "expected"),
    [
        ("google", "a@example.com", "google"),
        ("Microsoft", "a@gmail.com", "microsoft"),  # the row's provider wins, any case
        ("icloud", "a@gmail.com", "google"),  # not refreshable here: the domain decides
        (None, "A@GMail.com", "google"),
        (None, "a@googlemail.com", "google"),
        (None, "a@outlook.com", "microsoft"),
        (None, "a@hotmail.com", "microsoft"),
        (None, "a@live.com", "microsoft"),
        (None, "a@msn.com", "microsoft"),
        (None, "a@hotmail.co.uk", "microsoft"),  # every domain of the provider presets
        (None, "a@gmx.de", None),
        (None, "no-at-sign", None),
    ],
)
def test_provider_for(provider: str | None, email: str, expected: str | None) -> None:
    assert provider_for(provider, email) == expected


def oauth(**kw: object) -> OAuthSettings:
    base: dict[str, object] = {
        "google_client_id": "gid",
        "google_client_secret": Secret(CLIENT_SECRET),
        "microsoft_client_id": "mid",
        "microsoft_client_secret": Secret(CLIENT_SECRET),
        "microsoft_tenant": "contoso.example",
    }
    base.update(kw)
    return OAuthSettings(**base)  # type: ignore[arg-type]


def test_request_bodies_per_provider() -> None:
    clients = provider_clients(oauth())
    google = dict(urllib.parse.parse_qsl(refresh_body(clients["google"], REFRESH).decode()))
    assert google == {
        "grant_type": "refresh_token",
        "refresh_token": REFRESH,
        "client_id": "gid",
        "client_secret": CLIENT_SECRET,
    }
    microsoft = dict(urllib.parse.parse_qsl(refresh_body(clients["microsoft"], "r&t=1").decode()))
    assert microsoft["scope"] == MICROSOFT_SCOPE
    assert microsoft["refresh_token"] == "r&t=1"  # form-encoded, not spliced
    assert clients["microsoft"].token_url == (
        "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
    )
    assert clients["google"].token_url == "https://oauth2.googleapis.com/token"


def test_public_client_sends_no_secret_and_unconfigured_providers_are_absent() -> None:
    clients = provider_clients(oauth(microsoft_client_secret=None, google_client_id=None))
    assert set(clients) == {"microsoft"}
    form = dict(urllib.parse.parse_qsl(refresh_body(clients["microsoft"], REFRESH).decode()))
    assert "client_secret" not in form


def test_success_with_rotation() -> None:
    grant = reply(
        200,
        {"access_token": ACCESS, "expires_in": 3599, "token_type": "Bearer", "refresh_token": "n"},
    )
    assert isinstance(grant, TokenGrant)
    assert grant.access_token.reveal() == ACCESS
    assert grant.expires_in == 3599
    assert grant.refresh_token == Secret("n")
    assert ACCESS not in repr(grant) and "rotated=True" in repr(grant)


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [(None, DEFAULT_EXPIRES_IN), ("3600", 3600.0), (12.5, 12.5), (10**9, MAX_EXPIRES_IN)],
)
def test_expiry_forms(expires_in: object, expected: float) -> None:
    payload: dict[str, object] = {"access_token": ACCESS}
    if expires_in is not None:
        payload["expires_in"] = expires_in
    grant = reply(200, payload)
    assert isinstance(grant, TokenGrant)
    assert grant.expires_in == expected
    assert grant.refresh_token is None


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        [1, 2],
        {},
        {"access_token": ""},
        {"access_token": "has space"},
        {"access_token": "line\r\nbreak"},
        {"access_token": 7},
        {"access_token": ACCESS, "expires_in": -5},
        {"access_token": ACCESS, "expires_in": True},
        {"access_token": ACCESS, "expires_in": "soon"},
        {"access_token": ACCESS, "token_type": "mac"},
    ],
)
def test_unusable_success_replies_are_retryable_errors(payload: object) -> None:
    outcome = reply(200, payload)
    assert isinstance(outcome, TokenUnavailable)
    assert outcome.reason == TOKEN_ERROR
    assert ACCESS not in str(outcome)


@pytest.mark.parametrize("error", ["invalid_grant", "invalid_scope", "interaction_required"])
def test_refused_grants_are_revoked(error: str) -> None:
    outcome = reply(400, {"error": error, "error_description": "Token has been revoked."})
    assert isinstance(outcome, TokenUnavailable)
    assert outcome.reason == TOKEN_REVOKED
    assert error in str(outcome) and "sign in again" in str(outcome)


def test_provider_text_is_scrubbed_of_the_request_secrets() -> None:
    text = f"refresh token {REFRESH} for client secret {CLIENT_SECRET}\r\nforged line"
    outcome = reply(
        400,
        {"error": "invalid_grant", "error_description": text},
        scrubber=Scrubber((REFRESH, CLIENT_SECRET)),
    )
    assert isinstance(outcome, TokenUnavailable)
    message = str(outcome)
    assert REFRESH not in message and CLIENT_SECRET not in message
    assert "\n" not in message and "\r" not in message
    assert len(message) < 300


def test_client_rejection_names_the_variables() -> None:
    outcome = reply(401, {"error": "invalid_client"})
    assert isinstance(outcome, TokenUnavailable)
    assert outcome.reason == TOKEN_ERROR
    assert "TRIO_IDLE_GOOGLE_CLIENT_ID" in str(outcome)
    assert "TRIO_IDLE_GOOGLE_CLIENT_SECRET" in str(outcome)


@pytest.mark.parametrize(("status", "wait"), [(503, None), (500, 7.0), (429, 7.0)])
def test_server_trouble_is_retried_with_its_hint(status: int, wait: float | None) -> None:
    headers = {"Retry-After": "7"} if wait else {}
    outcome = reply(status, b"<html>oops</html>", headers)
    assert isinstance(outcome, TokenUnavailable)
    assert outcome.reason == TOKEN_ERROR
    assert outcome.retry_after == wait
    assert str(status) in str(outcome)


def test_a_strange_error_code_is_not_quoted() -> None:
    outcome = reply(400, {"error": "x" * 500 + "\n"})
    assert isinstance(outcome, TokenUnavailable)
    assert outcome.reason == TOKEN_ERROR
    assert "xxx" not in str(outcome)


def test_fingerprints_are_keyed() -> None:
    one, two = fingerprint_key(b"a" * 32), fingerprint_key(b"b" * 32)
    assert fingerprint(one, REFRESH) == fingerprint(one, REFRESH)
    assert fingerprint(one, REFRESH) != fingerprint(two, REFRESH)
    assert fingerprint(one, REFRESH) != fingerprint(one, REFRESH + "x")
    assert REFRESH not in fingerprint(one, REFRESH)


# -- settings ---------------------------------------------------------------------------


def parse(env: dict[str, str]) -> Settings:
    return parse_settings(env, require=(), require_source=False)


def test_oauth_settings_defaults_and_environment() -> None:
    assert Settings().oauth.microsoft_url == (
        "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    )
    settings = parse(
        {
            "TRIO_IDLE_GOOGLE_CLIENT_ID": "gid",
            "TRIO_IDLE_GOOGLE_CLIENT_SECRET": CLIENT_SECRET,
            "TRIO_IDLE_MICROSOFT_TENANT": "organizations",
            "TRIO_IDLE_MICROSOFT_TOKEN_URL": "http://127.0.0.1:9/{tenant}/token",
            "TRIO_IDLE_GOOGLE_TOKEN_URL": "http://127.0.0.1:9/token",
        }
    )
    assert settings.oauth.google_client_secret == Secret(CLIENT_SECRET)
    assert settings.oauth.microsoft_url == "http://127.0.0.1:9/organizations/token"
    assert settings.oauth.google_token_url == "http://127.0.0.1:9/token"
    assert CLIENT_SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"TRIO_IDLE_MICROSOFT_TENANT": "a/b"}, "TRIO_IDLE_MICROSOFT_TENANT"),
        ({"TRIO_IDLE_GOOGLE_TOKEN_URL": "ftp://x/token"}, "TRIO_IDLE_GOOGLE_TOKEN_URL"),
        ({"TRIO_IDLE_MICROSOFT_TOKEN_URL": "{tenant}"}, "TRIO_IDLE_MICROSOFT_TOKEN_URL"),
        ({"TRIO_IDLE_OAUTH_RATE": "0"}, "TRIO_IDLE_OAUTH_RATE"),
    ],
)
def test_bad_oauth_settings_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(env)
    assert str(caught.value).startswith(f"{name}: ")
    assert "\n" not in str(caught.value)


def test_client_secrets_have_no_flags() -> None:
    from trio_idle.core.config import OPTIONS

    secret = {o.env: o.flag for o in OPTIONS if o.group == "oauth" and o.secret}
    assert secret == {
        "TRIO_IDLE_GOOGLE_CLIENT_SECRET": None,
        "TRIO_IDLE_MICROSOFT_CLIENT_SECRET": None,
    }


# -- statements -------------------------------------------------------------------------


def test_token_statements_per_backend() -> None:
    assert "?4" in SQLITE_TOKEN_SQL.upsert and "$" not in SQLITE_TOKEN_SQL.upsert
    assert "$4" in POSTGRES_TOKEN_SQL.upsert and "?" not in POSTGRES_TOKEN_SQL.upsert
    assert POSTGRES_TOKEN_SQL.table in POSTGRES_TOKEN_SQL.create
    tables = [table for table, _ in POSTGRES_MIGRATIONS]
    assert tables == [
        "trio_idle_mailbox_state",
        "trio_idle_oauth_refresh_token",
        "trio_idle_account_health",
    ]
