"""Decryption of the IMAP passwords the backend stores (AES-256-GCM).

The Node backend writes ``<iv hex>:<auth tag hex>:<ciphertext hex>`` with a 12- or
16-byte IV and a 16-byte tag. How the 32-byte AES key is made from ``ENCRYPTION_KEY``
differs between backends, so it is a setting (:data:`KEY_DERIVATIONS`).

Guarantee: no exception raised here carries the plaintext, the ciphertext or the key;
messages name only what was wrong with the token's shape.
"""

from __future__ import annotations

import hashlib
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: ``utf8-prefix``: the first 32 bytes of the UTF-8 key string (what the original backend
#: does, so the key must be at least 32 characters). ``sha256``: SHA-256 of the key string.
KEY_DERIVATIONS: Final = ("utf8-prefix", "sha256")
MIN_KEY_CHARS: Final = 32
_IV_SIZES: Final = (12, 16)
_TAG_SIZE: Final = 16


class DecryptionError(ValueError):
    """A stored password could not be decrypted (wrong key, or a malformed token)."""


def key_problem(encryption_key: str, derivation: str) -> str | None:
    """What is wrong with ``ENCRYPTION_KEY`` for ``derivation`` (one line, the key not
    shown), or ``None``: the configuration's check, before any password is decrypted."""
    if derivation == "utf8-prefix" and (
        len(encryption_key) < MIN_KEY_CHARS or len(encryption_key.encode()) < 32
    ):
        return (
            f"must be at least {MIN_KEY_CHARS} characters (AES-256 key), got {len(encryption_key)}"
        )
    return None


def derive_key(encryption_key: str, derivation: str = "utf8-prefix") -> bytes:
    """Turn the ``ENCRYPTION_KEY`` string into the 32-byte AES-256 key."""
    if derivation == "utf8-prefix":
        raw = encryption_key.encode("utf-8")
        if len(encryption_key) < MIN_KEY_CHARS or len(raw) < 32:
            raise ValueError(f"must be at least {MIN_KEY_CHARS} characters")
        return raw[:32]
    if derivation == "sha256":
        if not encryption_key:
            raise ValueError("must not be empty")
        return hashlib.sha256(encryption_key.encode("utf-8")).digest()
    raise ValueError(f"unknown key derivation {derivation!r}, expected one of {KEY_DERIVATIONS}")


def _unhex(part: str, what: str) -> bytes:
    try:
        return bytes.fromhex(part)
    except ValueError:
        raise DecryptionError(f"{what} is not valid hex") from None


def decrypt_password(token: str, key: bytes) -> str:
    """Decrypt one ``iv:tag:ciphertext`` token with a key from :func:`derive_key`."""
    parts = token.strip().split(":")
    if len(parts) != 3:
        raise DecryptionError(
            f"expected 3 ':'-separated hex parts (iv:tag:ciphertext), got {len(parts)}"
        )
    iv = _unhex(parts[0], "iv")
    tag = _unhex(parts[1], "auth tag")
    ciphertext = _unhex(parts[2], "ciphertext")
    if len(iv) not in _IV_SIZES:
        raise DecryptionError(f"iv must be 12 or 16 bytes, got {len(iv)}")
    if len(tag) != _TAG_SIZE:
        raise DecryptionError(f"auth tag must be 16 bytes, got {len(tag)}")
    try:
        plaintext = AESGCM(key).decrypt(iv, ciphertext + tag, None)
    except InvalidTag:
        raise DecryptionError(
            "authentication failed (wrong ENCRYPTION_KEY or key derivation?)"
        ) from None
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptionError("decrypted password is not valid UTF-8") from None


def encrypt_password(plaintext: str, key: bytes, *, iv_size: int = 12) -> str:
    """Encrypt like the backend does, for operators seeding rows and for tests."""
    if iv_size not in _IV_SIZES:
        raise ValueError("iv_size must be 12 or 16")
    iv = os.urandom(iv_size)
    sealed = AESGCM(key).encrypt(iv, plaintext.encode("utf-8"), None)
    ciphertext, tag = sealed[:-_TAG_SIZE], sealed[-_TAG_SIZE:]
    return f"{iv.hex()}:{tag.hex()}:{ciphertext.hex()}"
