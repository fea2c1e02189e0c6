"""trio_idle.core.crypto against the Node backend's own AES-256-GCM code
(tests/node/crypto_compat.js).

Node encrypts → Python decrypts and the reverse, for both IV sizes and both key derivations;
wrong keys and malformed tokens raise DecryptionError with a message that names the problem
and leaks neither the password nor the key. Secrets reach Node through the environment and
stdin only, never argv.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from trio_idle.core.crypto import DecryptionError, decrypt_password, derive_key, encrypt_password

pytestmark = pytest.mark.node

SCRIPT = Path(__file__).parent.parent / "node" / "crypto_compat.js"
KEY = "k3y-0123456789abcdef0123456789abcdef-tail"  # 41 chars: utf8-prefix uses the first 32
OTHER_KEY = "other-0123456789abcdef0123456789abcdef"
DERIVATIONS = ["utf8-prefix", "sha256"]
IV_SIZES = [12, 16]
PASSWORDS = [
    "hunter2",
    "pässwörd-日本語-🔑",
    "with:colons:and\nnewline\n",
    "  leading and trailing spaces  ",
    "x" * 1000,
]


@pytest.fixture
def node(node_bin: str) -> str:
    """Node.js (tests/conftest.py: skipped locally when missing, a failure in CI)."""
    return node_bin


def run_node(
    node: str,
    mode: str,
    stdin: str,
    *,
    key: str = KEY,
    derivation: str = "utf8-prefix",
    iv_size: int = 16,
) -> subprocess.CompletedProcess[bytes]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ENCRYPTION_KEY": key,
        "KEY_DERIVATION": derivation,
        "IV_SIZE": str(iv_size),
    }
    return subprocess.run(
        [node, str(SCRIPT), mode],
        input=stdin.encode("utf-8"),
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )


def node_encrypt(
    node: str,
    password: str,
    *,
    key: str = KEY,
    derivation: str = "utf8-prefix",
    iv_size: int = 16,
) -> str:
    done = run_node(node, "encrypt", password, key=key, derivation=derivation, iv_size=iv_size)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode("ascii")


def node_decrypt(node: str, token: str, *, key: str = KEY, derivation: str = "utf8-prefix") -> str:
    done = run_node(node, "decrypt", token, key=key, derivation=derivation)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode("utf-8")


@pytest.mark.parametrize("derivation", DERIVATIONS)
@pytest.mark.parametrize("iv_size", IV_SIZES)
def test_node_encrypts_python_decrypts(node: str, derivation: str, iv_size: int) -> None:
    key = derive_key(KEY, derivation)
    for password in PASSWORDS:
        token = node_encrypt(node, password, derivation=derivation, iv_size=iv_size)
        iv_hex, tag_hex, _ = token.split(":")
        assert len(bytes.fromhex(iv_hex)) == iv_size
        assert len(bytes.fromhex(tag_hex)) == 16
        assert decrypt_password(token, key) == password


@pytest.mark.parametrize("derivation", DERIVATIONS)
@pytest.mark.parametrize("iv_size", IV_SIZES)
def test_python_encrypts_node_decrypts(node: str, derivation: str, iv_size: int) -> None:
    key = derive_key(KEY, derivation)
    for password in PASSWORDS:
        token = encrypt_password(password, key, iv_size=iv_size)
        assert len(bytes.fromhex(token.split(":")[0])) == iv_size
        assert node_decrypt(node, token, derivation=derivation) == password
        assert decrypt_password(token, key) == password


def test_utf8_prefix_cuts_bytes_not_characters(node: str) -> None:
    # byte 32 falls inside the two-byte "é": both sides must cut the UTF-8 bytes there
    key_string = "a" * 31 + "é" + "tail"
    token = node_encrypt(node, "s3cret", key=key_string)
    assert derive_key(key_string) == key_string.encode("utf-8")[:32]
    assert decrypt_password(token, derive_key(key_string)) == "s3cret"


def test_sha256_accepts_short_keys_like_node(node: str) -> None:
    token = node_encrypt(node, "s3cret", key="short", derivation="sha256")
    assert decrypt_password(token, derive_key("short", "sha256")) == "s3cret"


def test_empty_password_round_trips(node: str) -> None:
    # The crypto layer is faithful to the backend: Node produces a valid token for "" and
    # it decrypts to "". Refusing an empty IMAP password is the caller's decision.
    key = derive_key(KEY)
    token = node_encrypt(node, "")
    assert token.endswith(":")
    assert decrypt_password(token, key) == ""
    assert node_decrypt(node, encrypt_password("", key)) == ""


def _assert_leaks_nothing(error: DecryptionError, *secrets: str | bytes) -> None:
    text = f"{error!s} {error!r} {error.args!r}"
    for secret in secrets:
        shown = secret if isinstance(secret, str) else secret.hex()
        assert shown not in text
        if isinstance(secret, bytes):
            assert repr(secret) not in text
    # no chained exception that could carry key material into a traceback
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


@pytest.mark.parametrize(
    ("encrypt_with", "decrypt_with"),
    [
        ((KEY, "utf8-prefix"), (OTHER_KEY, "utf8-prefix")),
        ((KEY, "sha256"), (OTHER_KEY, "sha256")),
        ((KEY, "utf8-prefix"), (KEY, "sha256")),  # right key string, wrong derivation
    ],
)
def test_wrong_key_raises_without_leaking(
    node: str, encrypt_with: tuple[str, str], decrypt_with: tuple[str, str]
) -> None:
    password = "Very-Secret-Pässword-42"
    token = node_encrypt(node, password, key=encrypt_with[0], derivation=encrypt_with[1])
    wrong_key = derive_key(*decrypt_with)
    with pytest.raises(DecryptionError) as caught:
        decrypt_password(token, wrong_key)
    assert "authentication failed" in str(caught.value)
    _assert_leaks_nothing(
        caught.value,
        password,
        encrypt_with[0],
        decrypt_with[0],
        derive_key(*encrypt_with),
        wrong_key,
        token,
        token.split(":")[2],
    )


def test_tampered_token_raises(node: str) -> None:
    key = derive_key(KEY)
    iv, tag, ciphertext = node_encrypt(node, "hunter2").split(":")
    flipped = f"{int(ciphertext[0], 16) ^ 1:x}" + ciphertext[1:]
    for token in (f"{iv}:{tag}:{flipped}", f"{iv}:{'0' * 32}:{ciphertext}"):
        with pytest.raises(DecryptionError, match="authentication failed"):
            decrypt_password(token, key)


def test_node_rejects_python_token_under_wrong_key(node: str) -> None:
    token = encrypt_password("hunter2", derive_key(KEY))
    done = run_node(node, "decrypt", token, key=OTHER_KEY)
    assert done.returncode == 1
    assert b"hunter2" not in done.stdout + done.stderr


IV12 = "00" * 12
TAG = "11" * 16
CT = "abcd"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("", "expected 3"),
        (f"{IV12}:{TAG}", "expected 3"),
        (f"{IV12}:{TAG}:{CT}:{CT}", "expected 3"),
        (f"zz{IV12[2:]}:{TAG}:{CT}", "iv is not valid hex"),
        (f"{IV12}:{TAG[:-1]}g:{CT}", "auth tag is not valid hex"),
        (f"{IV12}:{TAG}:abc", "ciphertext is not valid hex"),  # odd length
        (f"{'00' * 8}:{TAG}:{CT}", "iv must be 12 or 16 bytes, got 8"),
        (f"{'00' * 32}:{TAG}:{CT}", "iv must be 12 or 16 bytes, got 32"),
        (f":{TAG}:{CT}", "iv must be 12 or 16 bytes, got 0"),
        (f"{IV12}:{TAG[:-2]}:{CT}", "auth tag must be 16 bytes, got 15"),
        (f"{IV12}::{CT}", "auth tag must be 16 bytes, got 0"),
    ],
)
def test_malformed_tokens_name_the_problem(token: str, expected: str) -> None:
    with pytest.raises(DecryptionError) as caught:
        decrypt_password(token, derive_key(KEY))
    assert expected in str(caught.value)
    _assert_leaks_nothing(caught.value, KEY, derive_key(KEY))
    if CT in token:
        assert CT not in str(caught.value)


def test_truncated_real_tag_is_rejected(node: str) -> None:
    iv, tag, ciphertext = node_encrypt(node, "hunter2", iv_size=12).split(":")
    with pytest.raises(DecryptionError, match="auth tag must be 16 bytes, got 12"):
        decrypt_password(f"{iv}:{tag[:24]}:{ciphertext}", derive_key(KEY))


def test_decryption_error_is_a_value_error() -> None:
    assert issubclass(DecryptionError, ValueError)
