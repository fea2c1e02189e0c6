"""The optional row fields of issue 12: authType, encryptedRefreshToken, imapSecurity, and
a row without a host taking its provider preset's server (Postgres rows and TOML file)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures import ROW_KEY, ROW_PASSWORD, connection_row
from trio_idle.accounts.connections import (
    AUTH_OAUTH2,
    AUTH_PASSWORD,
    MailConnection,
    RowProblem,
    build_connection,
)
from trio_idle.accounts.outcome_text import ConnectionSecrets
from trio_idle.accounts.providers import preset_named
from trio_idle.accounts.source_file import rows_from_toml
from trio_idle.core.crypto import derive_key, encrypt_password

KEY = ROW_KEY
OTHER_KEY = derive_key("Z" * 32)
PASSWORD = ROW_PASSWORD
REFRESH = "1//0g-refresh-token-sentinel-L"


def row(**changes: Any) -> dict[str, Any]:
    return connection_row(imapUser=None) | changes


def good(r: dict[str, Any]) -> MailConnection:
    result = build_connection(r, KEY)
    assert isinstance(result, MailConnection), result
    return result


def problem(r: dict[str, Any], key: bytes = KEY) -> str:
    result = build_connection(r, key)
    assert isinstance(result, RowProblem), result
    text = f"{result} {result!r}"
    assert PASSWORD not in text and REFRESH not in text
    return result.message


# -- authType -----------------------------------------------------------------------------


@pytest.mark.parametrize("absent", [{}, {"authType": None}, {"authType": ""}])
def test_rows_without_auth_type_are_password_rows(absent: dict[str, Any]) -> None:
    conn = good(row(**absent))
    assert conn.auth == AUTH_PASSWORD
    assert conn.password.reveal() == PASSWORD
    assert conn.refresh_token is None


@pytest.mark.parametrize("value", ["oauth2", "OAUTH2", " OAuth2 "])
def test_oauth2_rows_need_no_password(value: str) -> None:
    conn = good(row(authType=value, encryptedPassword=None))
    assert conn.auth == AUTH_OAUTH2
    assert conn.password.reveal() == ""
    assert conn.refresh_token is None  # the access token then comes from the backend


def test_an_oauth2_row_ignores_a_stale_password_column() -> None:
    conn = good(row(authType="oauth2", encryptedPassword="garbage-from-before"))
    assert conn.auth == AUTH_OAUTH2 and conn.password.reveal() == ""


def test_a_password_row_still_needs_its_password() -> None:
    assert "encryptedPassword is empty" in problem(row(authType="password", encryptedPassword=""))


@pytest.mark.parametrize("value", ["kerberos", "oauth", "password2", 7, "o\x1bauth2"])
def test_an_unknown_auth_type_is_a_row_problem_naming_the_field(value: object) -> None:
    assert problem(row(authType=value)).startswith("authType")


def test_an_overlong_auth_type_is_a_row_problem() -> None:
    message = problem(row(authType="oauth2" * 100))
    assert message.startswith("authType") and "at most" in message


# -- encryptedRefreshToken ---------------------------------------------------------------


def test_an_oauth2_row_s_refresh_token_is_decrypted_and_kept_secret() -> None:
    conn = good(
        row(
            authType="oauth2",
            encryptedPassword=None,
            encryptedRefreshToken=encrypt_password(REFRESH, KEY),
        )
    )
    assert conn.refresh_token is not None and conn.refresh_token.reveal() == REFRESH
    assert REFRESH not in repr(conn) and REFRESH not in str(conn)
    # the connection's scrubber masks the refresh token in server or library text
    assert REFRESH not in ConnectionSecrets.of(conn).scrub(f"token {REFRESH} refused")


def test_a_refresh_token_that_does_not_decrypt_is_a_row_problem() -> None:
    message = problem(
        row(authType="oauth2", encryptedRefreshToken=encrypt_password(REFRESH, OTHER_KEY))
    )
    assert message.startswith("cannot decrypt encryptedRefreshToken")


@pytest.mark.parametrize("plain", ["has space", "line\nbreak", "\x00nul", "x" * 9000])
def test_a_refresh_token_must_be_one_printable_bounded_word(plain: str) -> None:
    message = problem(row(authType="oauth2", encryptedRefreshToken=encrypt_password(plain, KEY)))
    assert "refresh token" in message or "encryptedRefreshToken" in message
    assert plain not in message


def test_a_password_row_s_refresh_token_column_is_not_used() -> None:
    conn = good(row(encryptedRefreshToken="not even a token"))
    assert conn.auth == AUTH_PASSWORD and conn.refresh_token is None


# -- imapSecurity -------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("tls", "tls"), ("STARTTLS", "starttls")])
def test_imap_security_overrides_the_global_setting_per_row(value: str, expected: str) -> None:
    assert good(row(imapSecurity=value)).security == expected


@pytest.mark.parametrize("absent", [{}, {"imapSecurity": None}, {"imapSecurity": " "}])
def test_without_imap_security_the_global_setting_applies(absent: dict[str, Any]) -> None:
    assert good(row(**absent)).security is None


@pytest.mark.parametrize("value", ["ssl", "auto", "t\x1bls", 1, ["tls"]])
def test_an_unknown_security_is_a_row_problem_naming_the_field(value: object) -> None:
    assert problem(row(imapSecurity=value)).startswith("imapSecurity")


def test_a_changed_security_restarts_the_session() -> None:
    # the reconciler restarts a session when its connection compares unequal
    assert good(row()) != good(row(imapSecurity="starttls"))


# -- host from the preset ----------------------------------------------------------------


@pytest.mark.parametrize("host", [None, "", "   "])
def test_a_row_without_host_takes_its_domain_s_preset(host: str | None) -> None:
    conn = good(row(email="bob@gmail.com", imapHost=host, imapPort=None))
    gmail = preset_named("gmail")
    assert (conn.host, conn.port, conn.security) == (gmail.host, gmail.port, gmail.security)
    assert conn.provider == "gmail"


def test_the_row_s_own_port_and_security_still_win() -> None:
    conn = good(row(email="b@gmx.de", imapHost=None, imapPort=143, imapSecurity="starttls"))
    assert (conn.host, conn.port, conn.security) == ("imap.gmx.net", 143, "starttls")
    # another port without a security of its own: the global setting decides (auto by port)
    conn = good(row(email="b@gmx.de", imapHost=None, imapPort=143))
    assert (conn.port, conn.security) == (143, None)


def test_a_row_without_host_and_an_unknown_domain_is_a_row_problem() -> None:
    message = problem(row(email="x@example.org", imapHost=None))
    assert message.startswith("imapHost") and "preset" in message


def test_a_row_with_a_known_host_records_the_provider_and_keeps_its_values() -> None:
    conn = good(row(email="boss@company.example", imapHost="IMAP.gmail.com", imapPort=993))
    assert (conn.host, conn.provider, conn.security) == ("imap.gmail.com", "gmail", None)
    assert good(row()).provider is None  # generic servers have no provider


def test_a_given_host_is_never_replaced_by_the_preset() -> None:
    conn = good(row(email="bob@gmail.com", imapHost="127.0.0.1", imapPort=1143))
    assert (conn.host, conn.port, conn.provider) == ("127.0.0.1", 1143, None)


# -- the TOML file ------------------------------------------------------------------------


def test_toml_keys_for_the_new_fields() -> None:
    data = {
        "connection": [
            {
                "id": "o",
                "email": "carol@outlook.com",
                "auth": "oauth2",
                "encrypted_refresh_token": encrypt_password(REFRESH, KEY),
            },
            {
                "id": "p",
                "email": "dave@example.com",
                "imap_host": "imap.example.com",
                "imap_security": "plain",
                "password_env": "DAVE_PW",
            },
        ]
    }
    rows = rows_from_toml(data, {"DAVE_PW": PASSWORD})
    oauth, plain = (good(r) for r in rows)
    assert (oauth.auth, oauth.host, oauth.port, oauth.provider) == (
        AUTH_OAUTH2,
        "outlook.office365.com",
        993,
        "microsoft",
    )
    assert oauth.refresh_token is not None and oauth.refresh_token.reveal() == REFRESH
    assert (plain.auth, plain.port, plain.security) == (AUTH_PASSWORD, 993, "plain")
    assert plain.password.reveal() == PASSWORD


def test_toml_bad_values_are_row_problems_for_that_entry_only() -> None:
    data = {
        "connection": [
            {"id": "a", "email": "a@gmail.com", "auth": "magic"},
            {"id": "b", "email": "b@gmail.com", "imap_security": "ssl", "password_env": "X"},
            {"id": "c", "email": "c@gmail.com", "password_env": "X"},
        ]
    }
    results = [build_connection(r, KEY) for r in rows_from_toml(data, {"X": PASSWORD})]
    assert [type(r).__name__ for r in results] == ["RowProblem", "RowProblem", "MailConnection"]
    assert str(results[0]).count("authType") and str(results[1]).count("imapSecurity")
