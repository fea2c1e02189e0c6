"""A real headless Chromium for the tests, as a browser that follows redirects.

From Debian's ``chromium`` package (``apt-get install -y chromium``; the nox ``tests``
session installs it like Dovecot). :func:`dump_dom` loads one URL the way a user's browser
would — following the redirects, running the page — and returns the DOM it ends on. It
runs as root (so ``--no-sandbox``), with a throwaway profile, no proxy, and the background
services that would reach out to Google switched off, so it opens no connection beyond
the loopback URLs it is given.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

import trio

from . import ServerStartError, ServerUnavailable, tail

__all__ = ["dump_dom", "find_chromium"]

#: the flags of every run (the issue's list, plus no proxy: the tests stay on loopback)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-proxy-server",
    "--disable-dev-shm-usage",
)


def find_chromium() -> Path:
    """``chromium``, or :class:`ServerUnavailable`."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin")
        if found is not None:
            return Path(found)
    raise ServerUnavailable("'chromium' not found (install the chromium package)")


async def dump_dom(binary: Path, url: str) -> str:
    """Load ``url`` (loopback only) in a fresh headless Chromium; the final page's DOM.
    Raises :class:`ServerStartError` with the browser's log if it fails. Bound it with
    ``trio.fail_after`` (a cancelled run kills the browser)."""
    host = urllib.parse.urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"{url}: the test browser opens loopback URLs only")
    with tempfile.TemporaryDirectory(prefix="trio-idle-chromium-") as profile:
        log = Path(profile) / "chromium.log"
        with log.open("wb") as log_file:
            done = await trio.run_process(
                [str(binary), *FLAGS, f"--user-data-dir={profile}/data", "--dump-dom", url],
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                stderr=log_file,
                check=False,
            )
        if done.returncode != 0:
            raise ServerStartError(f"chromium exited {done.returncode}:\n{tail(log)}")
        return bytes(done.stdout).decode("utf-8", "replace")
