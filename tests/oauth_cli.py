"""Helpers for the ``trio-idle oauth authorize`` tests: the CLI as a child process (its
stdout and stderr read as they come, the sign-in URL handed to the test's "browser"),
the in-process console that notices the URL, and a browser made of httpx."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
import httpx
import trio
from trio_idle_testing.oauth_server import OAuthTestServer

KEY = "oauth-authorize-test-key-0123456789abcdef"
CLIENT_ID = "trio-idle-test.apps.example"
#: begins with a leak-guard sentinel (tests/leak_guard.py)
CLIENT_SECRET = "oauth-cl1ent-s3cret-authorize"
#: the URL the command prints on a line of its own, indented
URL_LINE = re.compile(r"^    (https?://\S+)$", re.MULTILINE)
DEVICE_LINE = re.compile(r"enter the code (\S+)")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI child: this one without our variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TRIO_IDLE_") and k not in ("ENCRYPTION_KEY", "ADMIN_SECRET")
    }
    env.update(extra)
    return env


def google_args(server: OAuthTestServer, *extra: str) -> list[str]:
    return [
        "oauth",
        "authorize",
        "--provider",
        "google",
        "--client-id",
        CLIENT_ID,
        "--auth-url",
        server.authorization_url,
        "--token-url",
        server.token_url,
        *extra,
    ]


def microsoft_device_args(server: OAuthTestServer, *extra: str) -> list[str]:
    return [
        "oauth",
        "authorize",
        "--provider",
        "microsoft",
        "--client-id",
        CLIENT_ID,
        "--device",
        "--device-url",
        server.device_url,
        "--token-url",
        server.token_url,
        *extra,
    ]


@attrs.frozen
class CliRun:
    code: int
    stdout: str
    stderr: str


async def run_cli(
    argv: Sequence[str],
    env: Mapping[str, str],
    on_stderr: Callable[[str], Awaitable[None]],
) -> CliRun:
    """Run ``python -m trio_idle.cli *argv``; ``on_stderr(text so far)`` is awaited (in
    its own task) after each chunk of stderr. Bound it with ``trio.fail_after``."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_idle.cli", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
    )
    out: list[bytes] = []
    err: list[bytes] = []
    try:
        async with trio.open_nursery() as nursery:

            async def read_out() -> None:
                assert proc.stdout is not None
                async for chunk in proc.stdout:
                    out.append(bytes(chunk))

            async def read_err() -> None:
                assert proc.stderr is not None
                async for chunk in proc.stderr:
                    err.append(bytes(chunk))
                    nursery.start_soon(on_stderr, b"".join(err).decode("utf-8", "replace"))

            nursery.start_soon(read_out)
            nursery.start_soon(read_err)
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    assert proc.returncode is not None
    return CliRun(
        proc.returncode, b"".join(out).decode("utf-8"), b"".join(err).decode("utf-8", "replace")
    )


def once(
    action: Callable[[str], Awaitable[None]], pattern: re.Pattern[str]
) -> Callable[[str], Awaitable[None]]:
    """An ``on_stderr`` that calls ``action(match)`` the first time ``pattern`` shows up."""
    done = False

    async def watch(text: str) -> None:
        nonlocal done
        match = pattern.search(text)
        if match is None or done:
            return
        done = True
        await action(match[1])

    return watch


class Console(io.StringIO):
    """stderr of an in-process run: remembers the sign-in URL and device code it shows."""

    def __init__(self) -> None:
        super().__init__()
        self.url: str | None = None
        self.user_code: str | None = None
        self.shown = trio.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        if not self.shown.is_set():
            url = URL_LINE.search(self.getvalue())
            code = DEVICE_LINE.search(self.getvalue())
            if url is not None or code is not None:
                self.url = url[1] if url else None
                self.user_code = code[1] if code else None
                self.shown.set()
        return written


async def browse(url: str, *, before: Sequence[str] = ()) -> httpx.Response:
    """What a browser does with the sign-in URL: GET it, follow the provider's redirect
    to the loopback listener (first fetching ``before`` paths there, like a favicon), and
    return the listener's page. Loopback only: the redirect must point at 127.0.0.1."""
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=10) as http:
        consent = await http.get(url)
        assert consent.status_code == 302, consent.text
        location = consent.headers["location"]
        parts = urllib.parse.urlsplit(location)
        assert parts.scheme == "http" and parts.hostname == "127.0.0.1", location
        for path in before:
            stray = await http.get(f"http://127.0.0.1:{parts.port}{path}")
            assert stray.status_code == 404
        return await http.get(location)
