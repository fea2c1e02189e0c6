"""No secret value ever appears in a repr, a str, a problem message or a config error."""

from __future__ import annotations

import pytest

from tests.fixtures import mail_connection
from trio_idle.accounts.connections import MailConnection, build_connection
from trio_idle.backend.webhook import interpret_reply
from trio_idle.core.config import ConfigError, parse_settings
from trio_idle.core.crypto import DecryptionError, decrypt_password, derive_key, encrypt_password
from trio_idle.core.scrub import MASK
from trio_idle.core.secret import Secret

IMAP_PW = "hunter2"
ADMIN = "adm-Sup3rSecret"
ENC_KEY = "enc-key-0123456789-0123456789-abcdef"
DB_PW = "pg-Passw0rd-777"
SIGNING = "sign-S3cret-xyz"
SECRETS = (IMAP_PW, ADMIN, ENC_KEY, DB_PW, SIGNING)

ENV = {
    "ADMIN_SECRET": ADMIN,
    "ENCRYPTION_KEY": ENC_KEY,
    "DATABASE_URL": f"postgresql://app:{DB_PW}@db:5432/mail",
    "TRIO_IDLE_SIGNING_SECRET": SIGNING,
}


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked in {text!r}"


def test_secret_repr_and_str_are_masked() -> None:
    s = Secret(IMAP_PW)
    assert repr(s) == str(s) == f"Secret('{MASK}')"
    assert f"{s}" == f"{s!r}" == repr(s)
    assert_clean(repr([s, {"pw": s}]))
    assert s.reveal() == IMAP_PW


def test_secret_truthiness_and_equality() -> None:
    assert Secret(IMAP_PW) and not Secret("")
    assert Secret(IMAP_PW) == Secret(IMAP_PW)
    assert Secret(IMAP_PW) != Secret("other")


def test_settings_repr() -> None:
    s = parse_settings(ENV)
    assert_clean(repr(s))
    assert_clean(str(s))


def test_mail_connection_repr() -> None:
    conn = mail_connection(
        user_id=None, email="a@example.com", host="imap.example.com", login="a", password=IMAP_PW
    )
    assert_clean(repr(conn))
    assert_clean(str(conn))


def test_row_problem_from_wrong_key() -> None:
    key = derive_key(ENC_KEY)
    token = encrypt_password(IMAP_PW, key)
    problem = build_connection(
        {
            "id": "c9",
            "email": "a@example.com",
            "imapHost": "imap.example.com",
            "imapPort": 993,
            "encryptedPassword": token,
        },
        derive_key("W" * 32),
    )
    assert not isinstance(problem, MailConnection)
    assert_clean(str(problem))
    assert_clean(repr(problem))
    assert token not in str(problem)  # not even the ciphertext


def test_decryption_error_carries_no_key_or_token() -> None:
    key = derive_key(ENC_KEY)
    token = encrypt_password(IMAP_PW, key)
    with pytest.raises(DecryptionError) as info:
        decrypt_password(token, derive_key("W" * 32))
    text = str(info.value) + repr(info.value)
    assert_clean(text)
    assert token.split(":")[2] not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_short_key_derivation_error_carries_no_key() -> None:
    with pytest.raises(ValueError) as info:
        derive_key("short-" + IMAP_PW)
    assert IMAP_PW not in str(info.value)


@pytest.mark.parametrize(
    "extra",
    [
        {"ENCRYPTION_KEY": IMAP_PW},  # too short
        {"DATABASE_URL": f"mysql://app:{DB_PW}@db/mail"},
        {"DATABASE_URL": f"app:{DB_PW}@db/mail"},
        {"TRIO_IDLE_KEY_DERIVATION": "none"},
        {"TRIO_IDLE_TICK_INTERVAL": "x"},
    ],
)
def test_config_errors(extra: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({**ENV, **extra})
    assert_clean(str(info.value))
    assert_clean(repr(info.value))


def test_rejection_detail() -> None:
    reply = interpret_reply(401, {"x-admin-secret": ADMIN}, ADMIN.encode())
    assert_clean(reply.detail)
    assert_clean(repr(reply))
