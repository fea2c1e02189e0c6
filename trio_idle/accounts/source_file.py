"""The connection list from a TOML file: the embedded default for people without Postgres.

Format::

    [[connection]]
    id = "alice"                       # required, unique
    email = "alice@example.com"        # required
    imap_host = "imap.example.com"     # default: the provider preset of the email domain
    imap_port = 993                    # default 993 (or the preset's port)
    imap_security = "tls"              # optional: tls, starttls or plain; default: global
    folders = ["INBOX", "\\Junk"]       # optional: default TRIO_IDLE_FOLDERS
    folder_watch = "idle"              # optional: status or idle; default TRIO_IDLE_FOLDER_WATCH
    imap_user = "alice"                # default: email
    user_id = "u-1"                    # optional, sent to the backend as userId
    active = true                      # default true
    auth = "password"                  # or "oauth2" (no password then)
    # password rows, exactly one of:
    encrypted_password = "<iv hex>:<tag hex>:<ciphertext hex>"   # as the backend stores it
    password_env = "ALICE_IMAP_PASSWORD"                        # read from the environment
    # oauth2 rows, optionally (otherwise the access token comes from the backend):
    encrypted_refresh_token = "<iv hex>:<tag hex>:<ciphertext hex>"

The file is re-read at every refresh, so editing it adds, removes or restarts sessions.
Passwords never appear in the file in clear text.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tomllib
from collections.abc import Mapping
from typing import Any, Final

import trio

from trio_idle.core.errors import SourceError


def rows_from_toml(data: Mapping[str, Any], env: Mapping[str, str]) -> list[dict[str, Any]]:
    """Pure: parsed TOML → rows with the ``"MailConnection"`` column names (active only)."""
    entries = data.get("connection", [])
    if not isinstance(entries, list):
        raise SourceError("'connection' must be an array of tables ([[connection]])")
    rows: list[dict[str, Any]] = []
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise SourceError(f"connection #{n} must be a table")
        if not entry.get("active", True):
            continue
        row: dict[str, Any] = {
            "id": entry.get("id") or f"<entry {n}>",
            "userId": entry.get("user_id"),
            "email": entry.get("email"),
            "imapHost": entry.get("imap_host"),
            "imapPort": entry.get("imap_port"),
            "imapUser": entry.get("imap_user"),
            "encryptedPassword": entry.get("encrypted_password"),
            "authType": entry.get("auth"),
            "encryptedRefreshToken": entry.get("encrypted_refresh_token"),
            "imapSecurity": entry.get("imap_security"),
            "imapFolders": entry.get("folders"),
            "imapFolderWatch": entry.get("folder_watch"),
        }
        port = entry.get("imap_port")
        if port is None:
            # a row without a host takes the preset's port; one with a host defaults to 993
            row["imapPort"] = None if entry.get("imap_host") is None else 993
        elif isinstance(port, bool) or not isinstance(port, int):
            row["imapPort"] = f"{port!r}"  # build_connection reports it for this row
        if entry.get("password_env") is not None and entry.get("encrypted_password"):
            row["passwordProblem"] = "set encrypted_password or password_env, not both"
        elif (var := entry.get("password_env")) is not None:
            value = env.get(str(var))
            # build_connection reports a missing password for this row only
            row["password"] = value if value else None
            row["passwordSource"] = f"environment variable {var}"
        rows.append(row)
    return rows


#: bytes of the file version's digest
VERSION_BYTES: Final = 16


class FileSource:
    """Reads the TOML file at each refresh (:meth:`fetch_changed`: only when it changed)."""

    name = "file"

    def __init__(self, path: str, env: Mapping[str, str] | None = None) -> None:
        self.path = path
        self._env = os.environ if env is None else env
        self._salt = secrets.token_bytes(16)
        #: the file digest of the last parse, and the environment variables its rows read
        self._parsed: tuple[bytes, tuple[str, ...]] | None = None

    async def fetch(self) -> list[dict[str, Any]]:
        """The file's active rows. Read and parsed in a worker thread: parsing 10,000
        entries takes most of a second, which the event loop must not wait for."""
        answer = await self.fetch_changed(None)
        assert answer is not None  # without a version the rows always come
        return answer[1]

    async def fetch_changed(
        self, version: bytes | None
    ) -> tuple[bytes, list[dict[str, Any]]] | None:
        """The rows and their version, or None when the file and the environment
        variables its rows name are still those of ``version`` (from an earlier answer).

        The refresh calls this: an unchanged file (most refreshes) is read and hashed,
        not parsed, which is what keeps a refresh of 10,000 rows from competing with the
        event loop for the GIL for most of a second.
        """
        try:
            return await trio.to_thread.run_sync(self._read, version)
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{self.path} is not valid TOML: {exc}") from None

    def _read(self, version: bytes | None = None) -> tuple[bytes, list[dict[str, Any]]] | None:
        """:meth:`fetch_changed` in the calling thread."""
        with open(self.path, "rb") as f:
            data = f.read()
        if version is not None and self._parsed is not None:
            file_digest, names = self._parsed
            if self._digests(data, names) == (file_digest, version):
                return None
        return self._parse(data)

    def _parse(self, data: bytes) -> tuple[bytes, list[dict[str, Any]]]:
        parsed = tomllib.loads(data.decode("utf-8"))
        rows = rows_from_toml(parsed, self._env)
        names = password_env_names(parsed)
        file_digest, version = self._digests(data, names)
        self._parsed = (file_digest, names)
        return version, rows

    def _digests(self, data: bytes, names: tuple[str, ...]) -> tuple[bytes, bytes]:
        """``(the file's digest, the version: the file's and the named variables')``."""
        h = hashlib.blake2b(data, digest_size=VERSION_BYTES, key=self._salt)
        file_digest = h.digest()
        for name in names:  # the values are passwords: only their keyed digest is kept
            h.update(b"\0" + name.encode("utf-8", "surrogatepass") + b"\0")
            h.update(self._env.get(name, "\0unset").encode("utf-8", "surrogatepass"))
        return file_digest, h.digest()


def password_env_names(data: Mapping[str, Any]) -> tuple[str, ...]:
    """Pure: the environment variables the parsed file's entries read passwords from."""
    entries = data.get("connection", [])
    if not isinstance(entries, list):
        return ()
    names = {
        str(e["password_env"])
        for e in entries
        if isinstance(e, dict) and e.get("password_env") is not None
    }
    return tuple(sorted(names))
