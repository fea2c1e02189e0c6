"""The rotation store: the newest refresh token of each connection whose provider rotated
it, encrypted with ``ENCRYPTION_KEY`` in the daemon's state store next to a keyed
fingerprint of the row's token it replaced (so the row's token wins again as soon as it
changes). Used by :class:`~trio_idle.auth.token_refresh.RefreshingTokens`; the backend's
tables are never written.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Final

import trio
from loguru import logger

from trio_idle.accounts.credentials import TOKEN_ERROR, TokenUnavailable
from trio_idle.core.crypto import DecryptionError, decrypt_password, encrypt_password
from trio_idle.core.scrub import PLAIN
from trio_idle.state.records import StoredRefreshToken, TokenBackend

#: how long a rotated token's write to the store may hold up a cancellation
STORE_WRITE_TIMEOUT: Final = 5.0


def fingerprint_key(key: bytes) -> bytes:
    """The key of :func:`fingerprint`, derived from the AES key so neither reveals the other."""
    return hmac.new(key, b"trio-idle refresh-token fingerprint", hashlib.sha256).digest()


def fingerprint(fp_key: bytes, refresh_token: str) -> str:
    """Which row token a stored rotation replaced, without storing that token: a keyed
    hash (HMAC-SHA256, hex)."""
    return hmac.new(fp_key, refresh_token.encode("utf-8"), hashlib.sha256).hexdigest()


class RotatedTokens:
    """The newest refresh token of each connection whose provider rotated it.

    Loaded once from the store (on first use, retried until it worked); each rotation is
    kept in memory at once and written to the store straight away. A write that fails
    stays pending and is tried again before the connection's next refresh, so at worst
    the store is one rotation behind while it is down. Without a store (``state =
    none``) rotations last as long as the process.
    """

    def __init__(self, backend: TokenBackend | None, key: bytes) -> None:
        self.backend = backend
        self._key = key
        self._tokens: dict[str, StoredRefreshToken] = {}
        self._pending: dict[str, StoredRefreshToken] = {}
        self._loaded = backend is None
        self._load_lock = trio.Lock()
        self._warned_no_store = False
        self._load_failures = 0

    async def ensure_loaded(self) -> None:
        """Read the store once. Raises :class:`TokenUnavailable` (``token_error``) while
        it cannot be read: refreshing with the row's token instead could spend a token
        the provider has already replaced."""
        if self._loaded:
            return
        async with self._load_lock:
            if self._loaded or self.backend is None:
                return
            try:
                loaded = await self.backend.load_tokens()
            except Exception as exc:
                self._load_failures += 1
                # every connection's refresh tries again: one error line, then quieter
                log = logger.error if self._load_failures == 1 else logger.debug
                log(
                    f"[idle/oauth] cannot read the rotated refresh tokens "
                    f"({self.backend.name}): {type(exc).__name__}: {PLAIN.scrub(exc, 200)}"
                    + _migrate_hint(self.backend)
                )
                raise TokenUnavailable(
                    TOKEN_ERROR, f"cannot read the rotated refresh tokens ({self.backend.name})"
                ) from None
            # a rotation that happened before the load finished is newer than the store
            self._tokens = {**loaded, **self._tokens}
            self._loaded = True
            if loaded or self._load_failures:
                logger.info(f"[idle/oauth] loaded {len(loaded)} rotated refresh tokens")

    def current(self, conn_id: str, row_fingerprint: str) -> str | None:
        """The rotated token to use instead of the row's, or ``None`` (use the row's): none
        stored, or the row's token changed since (its fingerprint differs), or the stored
        one no longer decrypts (``ENCRYPTION_KEY`` changed)."""
        stored = self._tokens.get(conn_id)
        if stored is None or not hmac.compare_digest(stored.replaces, row_fingerprint):
            return None
        try:
            return decrypt_password(stored.encrypted, self._key)
        except DecryptionError as exc:
            logger.warning(
                f"[idle/oauth] connection {PLAIN.scrub(conn_id, 80)}: the stored rotated "
                f"refresh token does not decrypt ({exc}); using the row's"
            )
            return None

    async def keep(self, conn_id: str, refresh_token: str, row_fingerprint: str) -> None:
        """The provider rotated ``conn_id``'s token: use ``refresh_token`` from now on and
        write it to the store (shielded, at most :data:`STORE_WRITE_TIMEOUT` seconds)."""
        stored = StoredRefreshToken(
            encrypt_password(refresh_token, self._key), row_fingerprint, time.time()
        )
        self._tokens[conn_id] = stored
        if self.backend is None:
            if not self._warned_no_store:
                self._warned_no_store = True
                logger.warning(
                    "[idle/oauth] a provider rotated a refresh token and TRIO_IDLE_STATE=none: "
                    "the new one is kept only until the daemon stops"
                )
            return
        self._pending[conn_id] = stored
        with trio.CancelScope(shield=True), trio.move_on_after(STORE_WRITE_TIMEOUT):
            await self.flush(conn_id)

    async def flush(self, conn_id: str) -> bool:
        """Write ``conn_id``'s pending rotation, if any. False if it stays pending."""
        stored = self._pending.get(conn_id)
        if stored is None or self.backend is None:
            return True
        try:
            await self.backend.save_token(conn_id, stored)
        except Exception as exc:
            logger.error(
                f"[idle/oauth] connection {PLAIN.scrub(conn_id, 80)}: cannot store the "
                f"rotated refresh token ({self.backend.name}): {type(exc).__name__}: "
                f"{PLAIN.scrub(exc, 200)}; using it from memory, will retry"
                + _migrate_hint(self.backend)
            )
            return False
        if self._pending.get(conn_id) is stored:  # a newer rotation may have come meanwhile
            del self._pending[conn_id]
        return True


def _migrate_hint(backend: TokenBackend) -> str:
    return " (run `trio-idle db migrate`)" if backend.name == "postgres" else ""
