"""The first log line of ``serve`` names the backend without the credentials of its URL."""

from __future__ import annotations

import functools
import io
from typing import Any

import pytest

from tests.harness import restore_stderr_sink
from trio_idle import cli
from trio_idle.core import logs


def test_start_line_hides_credentials_in_backend_url(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(cli, "setup_logging", functools.partial(logs.setup_logging, stream=stream))

    async def no_daemon(settings: Any, environ: Any = None) -> None:
        return None

    monkeypatch.setattr(cli, "serve", no_daemon)
    env = {
        "ADMIN_SECRET": "cli-admin-s3cret",
        "ENCRYPTION_KEY": "k" * 40,
        "DATABASE_URL": "postgresql://u:cli-db-pw@127.0.0.1:9/db",
        "BACKEND_URL": "http://scanner:backend-url-pw@127.0.0.1:3016",
    }
    try:
        assert cli.main(["serve"], env) == 0
    finally:
        restore_stderr_sink()  # the CLI replaced the sinks
        logs.protect_secrets(())
    text = stream.getvalue()
    assert "starting (source=postgres, backend=http://********@127.0.0.1:3016/api/mail/" in text
    assert "backend-url-pw" not in text and "scanner" not in text
