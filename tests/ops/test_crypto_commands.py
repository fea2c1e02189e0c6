"""``trio-idle encrypt`` / ``decrypt --check`` as real processes, checked by the Node code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.conftest import cli_env

SCRIPT = Path(__file__).parent.parent / "node" / "crypto_compat.js"
KEY = "ops-k3y-0123456789abcdef0123456789abcdef"
PASSWORDS = ["hunter2", "pässwörd-日本語-🔑 with spaces", "with:colons", "x" * 500]


def trio_idle(
    *args: str, stdin: str, key: str | None = KEY, **env: str
) -> subprocess.CompletedProcess[str]:
    extra = dict(env)
    if key is not None:
        extra["ENCRYPTION_KEY"] = key
    # only ENCRYPTION_KEY: no DATABASE_URL, no ADMIN_SECRET
    return subprocess.run(
        [sys.executable, "-m", "trio_idle.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(**extra),
        timeout=60,
        check=False,
    )


def node_decrypt(node: str, token: str, derivation: str = "utf8-prefix") -> str:
    result = subprocess.run(
        [node, str(SCRIPT), "decrypt"],
        input=token.encode(),
        capture_output=True,
        env={"ENCRYPTION_KEY": KEY, "KEY_DERIVATION": derivation},
        timeout=60,
        check=True,
    )
    return result.stdout.decode("utf-8")


def node_encrypt(node: str, password: str) -> str:
    result = subprocess.run(
        [node, str(SCRIPT), "encrypt"],
        input=password.encode(),
        capture_output=True,
        env={"ENCRYPTION_KEY": KEY},
        timeout=60,
        check=True,
    )
    return result.stdout.decode()


@pytest.mark.parametrize("password", PASSWORDS)
def test_encrypt_output_decrypts_with_the_node_backend(node_bin: str, password: str) -> None:
    result = trio_idle("encrypt", stdin=password + "\n")  # like `echo pw | trio-idle encrypt`
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert node_decrypt(node_bin, token) == password
    iv = token.split(":")[0]
    assert len(bytes.fromhex(iv)) == 16  # the backend's IV size by default
    assert password not in result.stdout + result.stderr


def test_encrypt_sha256_derivation_and_12_byte_iv(node_bin: str) -> None:
    result = trio_idle(
        "encrypt", "--iv-size", "12", stdin="hunter2", TRIO_IDLE_KEY_DERIVATION="sha256"
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert len(bytes.fromhex(token.split(":")[0])) == 12
    assert node_decrypt(node_bin, token, "sha256") == "hunter2"


def test_encrypt_refuses_empty_input_and_needs_the_key() -> None:
    empty = trio_idle("encrypt", stdin="")
    assert empty.returncode == 1 and "empty password" in empty.stderr
    no_key = trio_idle("encrypt", stdin="pw", key=None)
    assert no_key.returncode == 2
    assert "configuration error: ENCRYPTION_KEY: is required" in no_key.stderr


def test_decrypt_check_reports_each_token_without_plaintext(node_bin: str) -> None:
    good = node_encrypt(node_bin, "node-secret-pw")
    other = trio_idle("encrypt", stdin="other-secret-pw", key="another-key-" + "z" * 30)
    assert other.returncode == 0
    stdin = f"# id token\nc-good\t{good}\n\nc-other {other.stdout.strip()}\nnot-a-token\n"
    result = trio_idle("decrypt", "--check", stdin=stdin)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "c-good: ok",
        "c-other: FAILED: authentication failed (wrong ENCRYPTION_KEY or key derivation?)",
        "line 5: FAILED: expected 3 ':'-separated hex parts (iv:tag:ciphertext), got 1",
        "3 tokens: 1 ok, 2 failed",
    ]
    assert "node-secret-pw" not in result.stdout + result.stderr
    all_good = trio_idle("decrypt", "--check", stdin=good + "\n")
    assert all_good.returncode == 0 and all_good.stdout.startswith("line 1: ok")


def test_decrypt_without_check_refuses() -> None:
    result = trio_idle("decrypt", stdin="aa:bb:cc\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "refusing to print passwords" in result.stderr
