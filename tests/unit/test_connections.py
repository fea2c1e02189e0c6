"""Rows → validated MailConnections; bad rows become RowProblems, never exceptions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tests.fixtures import ROW_KEY, ROW_PASSWORD, connection_row
from trio_idle.accounts.connections import (
    MailConnection,
    RowProblem,
    build_connection,
    build_connections,
)
from trio_idle.accounts.source_file import rows_from_toml
from trio_idle.core.crypto import decrypt_password, derive_key, encrypt_password
from trio_idle.core.errors import SourceError

KEY = ROW_KEY
OTHER_KEY = derive_key("Z" * 32)
PASSWORD = ROW_PASSWORD


def row(**changes: Any) -> dict[str, Any]:
    return connection_row(**changes)


def problem(r: dict[str, Any], key: bytes = KEY) -> RowProblem:
    result = build_connection(r, key)
    assert isinstance(result, RowProblem), result
    assert r.get("id") is None or result.connection_id == str(r["id"])
    assert PASSWORD not in str(result) and PASSWORD not in repr(result)
    return result


def test_good_row() -> None:
    conn = build_connection(row(), KEY)
    assert isinstance(conn, MailConnection)
    assert (conn.id, conn.user_id, conn.email) == ("c1", "u1", "alice@example.com")
    assert (conn.host, conn.port, conn.login) == ("imap.example.com", 993, "alice")
    assert conn.password.reveal() == PASSWORD
    assert conn.label == "alice@example.com"


def test_16_byte_iv_tokens_decrypt_too() -> None:
    conn = build_connection(row(encryptedPassword=encrypt_password(PASSWORD, KEY, iv_size=16)), KEY)
    assert isinstance(conn, MailConnection)
    assert conn.password.reveal() == PASSWORD


def test_null_imap_user_logs_in_with_the_email() -> None:
    conn = build_connection(row(imapUser=None), KEY)
    assert isinstance(conn, MailConnection)
    assert conn.login == "alice@example.com"


def test_empty_user_id_becomes_none() -> None:
    conn = build_connection(row(userId=""), KEY)
    assert isinstance(conn, MailConnection) and conn.user_id is None


def test_port_given_as_text_is_accepted() -> None:
    conn = build_connection(row(imapPort="143"), KEY)
    assert isinstance(conn, MailConnection) and conn.port == 143


def test_ipv6_literal_host_is_unbracketed() -> None:
    conn = build_connection(row(imapHost="[::1]"), KEY)
    assert isinstance(conn, MailConnection) and conn.host == "::1"


def test_wrong_key_names_the_row_and_not_the_password() -> None:
    p = problem(row(id="conn-42"), OTHER_KEY)
    assert p.connection_id == "conn-42"
    assert "conn-42" in str(p)
    assert "cannot decrypt" in p.message
    assert "ENCRYPTION_KEY" in p.message


@pytest.mark.parametrize(
    ("token", "fragment"),
    [
        ("", "encryptedPassword is empty"),
        ("abc", "3 ':'-separated"),
        ("zz:00:00", "iv is not valid hex"),
        ("00" * 12 + ":" + "00" * 8 + ":00", "auth tag must be 16 bytes"),
        ("00" * 5 + ":" + "00" * 16 + ":00", "iv must be 12 or 16 bytes"),
    ],
)
def test_malformed_token(token: str, fragment: str) -> None:
    assert fragment in problem(row(encryptedPassword=token)).message


@pytest.mark.parametrize("host", ["", "exa mple.com", "a/b", None, "imap.example.com:993"])
def test_bad_host(host: str | None) -> None:
    assert "imapHost" in problem(row(imapHost=host)).message


@pytest.mark.parametrize("port", [0, 70000, -1, 65536, "65536", "0"])
def test_port_out_of_range(port: int) -> None:
    assert "imapPort: expected an integer 1-65535" in problem(row(imapPort=port)).message


@pytest.mark.parametrize(
    "port",
    [
        "abc",
        "99x",
        [993],
        True,
        993.9,
        float("inf"),
        float("nan"),
        Decimal("Infinity"),
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("993.9"),
        "9" * 5000,
        "٩٩٣",  # Arabic-Indic digits: isdigit() but not a port anyone typed
        None,
    ],
)
def test_port_that_is_not_an_integer_is_a_row_problem(port: object) -> None:
    # Decimal('Infinity') used to raise OverflowError out of the refresh and end the daemon;
    # 993.9 used to become 993 without a word.
    message = problem(row(imapPort=port)).message
    assert message.startswith("imapPort: expected an integer 1-65535, got ")
    assert len(message) < 120


@pytest.mark.parametrize("port", [993, "993", " 143 ", Decimal("993"), 993.0])
def test_integral_port_values_are_accepted(port: object) -> None:
    conn = build_connection(row(imapPort=port), KEY)
    expected = int(port.strip()) if isinstance(port, str) else int(port)  # type: ignore[call-overload]
    assert isinstance(conn, MailConnection) and conn.port == expected


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("email", "alice@example.com\n[idle/db] refreshed — 0 active connections"),
        ("email", "alice@example.com\rX"),
        ("email", "a\u2028b@example.com"),
        ("email", "a" * 400 + "@example.com"),
        ("email", "alice @example.com"),
        ("imapUser", "alice\r\nA1 DELETE INBOX"),
        ("imapUser", "x" * 1000),
        ("userId", "u\x1b[31m"),
        ("imapHost", "imap.example.com\nx"),
        ("imapHost", "a" * 64 + ".example.com"),
        ("imapHost", "x." * 200 + "com"),
        ("imapHost", "999.1.1.1"),
        ("imapHost", "imap..example.com"),
        ("imapHost", "-imap.example.com"),
        ("imapHost", 12345),
        ("encryptedPassword", "00" * 20000),
        ("email", {"nested": "dict"}),
    ],
)
def test_hostile_field_values_are_row_problems_naming_the_field(column: str, value: object) -> None:
    p = problem(row(**{column: value}))
    assert column in p.message
    assert "\n" not in p.message and "\r" not in p.message and "\x1b" not in p.message
    assert len(p.message) < 200


def test_a_hostile_id_is_shown_escaped_and_short() -> None:
    p = build_connection(row(id="c1\n[idle/db] forged" + "x" * 500), KEY)
    assert isinstance(p, RowProblem)
    assert "\n" not in p.connection_id and len(p.connection_id) < 100
    assert "id" in p.message


def test_a_password_with_crlf_is_refused_once_as_a_row_problem() -> None:
    p = problem(row(encryptedPassword=encrypt_password("pw\r\nA1 LOGOUT", KEY)))
    assert "CR, LF or NUL" in p.message
    assert "LOGOUT" not in p.message


def test_a_row_that_is_not_a_mapping_is_skipped_not_fatal() -> None:
    good, problems = build_connections([row(), ["not", "a", "row"], 42], KEY)  # type: ignore[list-item]
    assert list(good) == ["c1"]
    assert len(problems) == 2


class _Hostile:
    def __str__(self) -> str:
        raise RuntimeError("boom")

    def __repr__(self) -> str:
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    "column", ["id", "email", "imapHost", "imapPort", "imapUser", "userId", "encryptedPassword"]
)
def test_values_whose_str_raises_never_escape(column: str) -> None:
    result = build_connection(row(**{column: _Hostile()}), KEY)
    assert isinstance(result, RowProblem)


def test_host_names_are_lowercased_and_literals_normalised() -> None:
    conn = build_connection(row(imapHost="IMAP.Example.COM."), KEY)
    assert isinstance(conn, MailConnection) and conn.host == "imap.example.com"
    conn = build_connection(row(imapHost="[0:0::1]"), KEY)
    assert isinstance(conn, MailConnection) and conn.host == "::1"


def test_missing_email() -> None:
    assert "email is empty" in problem(row(email="  ")).message


def test_missing_id_is_labelled() -> None:
    p = build_connection(row(id=None, email=""), KEY)
    assert isinstance(p, RowProblem) and p.connection_id == "<no id>"


def test_duplicate_id_keeps_the_first_row() -> None:
    good, problems = build_connections([row(), row(email="bob@example.com"), row(id="c2")], KEY)
    assert sorted(good) == ["c1", "c2"]
    assert good["c1"].email == "alice@example.com"
    assert problems == [RowProblem("c1", "duplicate id; keeping the first row")]


def test_bad_rows_do_not_stop_good_ones() -> None:
    good, problems = build_connections(
        [row(id="a"), row(id="b", imapPort=0), row(id="c", imapHost="a/b"), row(id="d")], KEY
    )
    assert sorted(good) == ["a", "d"]
    assert [p.connection_id for p in problems] == ["b", "c"]


# -- file source rows -------------------------------------------------------------------


def toml_entry(**kw: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": "alice",
        "email": "alice@example.com",
        "imap_host": "imap.example.com",
    }
    entry.update(kw)
    return entry


def test_file_row_with_password_env() -> None:
    rows = rows_from_toml(
        {"connection": [toml_entry(password_env="ALICE_PW", user_id="u-1")]},
        {"ALICE_PW": PASSWORD},
    )
    assert len(rows) == 1
    conn = build_connection(rows[0], KEY)
    assert isinstance(conn, MailConnection)
    assert conn.password.reveal() == PASSWORD
    assert conn.port == 993  # default
    assert conn.login == "alice@example.com"  # default
    assert conn.user_id == "u-1"


def test_file_row_with_missing_password_env_is_a_problem_for_that_row_only() -> None:
    rows = rows_from_toml(
        {
            "connection": [
                toml_entry(password_env="ALICE_PW"),
                toml_entry(id="bob", email="bob@example.com", password_env="BOB_PW"),
            ]
        },
        {"BOB_PW": "bob-pw"},
    )
    good, problems = build_connections(rows, KEY)
    assert list(good) == ["bob"]
    assert len(problems) == 1
    assert problems[0].connection_id == "alice"
    assert "environment variable ALICE_PW is not set" in problems[0].message


def test_file_row_with_empty_password_env_is_a_problem() -> None:
    rows = rows_from_toml({"connection": [toml_entry(password_env="PW")]}, {"PW": ""})
    assert "PW" in problem(rows[0]).message


def test_file_row_with_encrypted_password() -> None:
    token = encrypt_password(PASSWORD, KEY)
    rows = rows_from_toml(
        {"connection": [toml_entry(encrypted_password=token, imap_port=143, imap_user="al")]}, {}
    )
    conn = build_connection(rows[0], KEY)
    assert isinstance(conn, MailConnection)
    assert (conn.port, conn.login, conn.password.reveal()) == (143, "al", PASSWORD)


def test_inactive_entries_are_skipped() -> None:
    rows = rows_from_toml(
        {
            "connection": [
                toml_entry(id="on", password_env="PW"),
                toml_entry(id="off", active=False, password_env="PW"),
                toml_entry(id="on2", active=True, password_env="PW"),
            ]
        },
        {"PW": "x"},
    )
    assert [r["id"] for r in rows] == ["on", "on2"]


def test_entry_without_id_gets_a_label() -> None:
    rows = rows_from_toml({"connection": [toml_entry(id=None, password_env="PW")]}, {"PW": "x"})
    assert rows[0]["id"] == "<entry 1>"


def test_no_connections_is_an_empty_list() -> None:
    assert rows_from_toml({}, {}) == []


@pytest.mark.parametrize("data", [{"connection": {"id": "x"}}, {"connection": ["x"]}])
def test_malformed_file_structure_raises_source_error(data: dict[str, Any]) -> None:
    with pytest.raises(SourceError):
        rows_from_toml(data, {})


def test_encrypt_decrypt_round_trip() -> None:
    token = encrypt_password("pässwörd", KEY)
    assert decrypt_password(token, KEY) == "pässwörd"
