"""The suite-wide sentinel check: no test's output may contain one of the test secrets.

Every suite that runs the daemon or the CLI uses recognisable secrets (IMAP passwords,
``ADMIN_SECRET``, ``ENCRYPTION_KEY``, database passwords: :data:`SENTINELS`). This plugin
collects what each test produced — every loguru record with its exception text, the
test's captured stdout/stderr, and whatever ``capsys.readouterr()`` handed to it — and
fails the test that let a sentinel through, naming the first offending line. The bodies
of ``/status``, ``/metrics``, ``/healthz`` and ``/readyz`` that a test fetches with httpx
are collected too.

Two more checks, through the test kit's :mod:`trio_idle_testing.witness`:

- access and refresh tokens: every token a test server hands the daemon during a test
  (:class:`~trio_idle_testing.oauth_server.OAuthTestServer`, the token route of
  :class:`~trio_idle_testing.backend.ScanBackend`) is a secret of that test, whatever
  it looks like, and must not appear in its output either;
- what the backend received: the body of every request a
  :class:`~trio_idle_testing.backend.ScanBackend` got during the test (scans, account
  health reports, token requests) must hold no sentinel and no issued token. (Headers are
  not checked: ``x-admin-secret`` carries the admin secret by contract.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any, Final

import pytest
from loguru import logger

#: the secrets of the suites, recognisable on sight; keep in sync where they are defined
SENTINELS: Final = (
    "test-admin-secret-value",  # tests/harness.py ADMIN_SECRET
    "integration-test-key-0123456789abcdef",  # tests/harness.py KEY
    "S3ntinel-pw-reliability",  # tests/reliability/rig.py PASSWORD
    "S3ntinel-pw-sigterm",  # tests/reliability/test_serve_sigterm.py
    "S3ntinel-pw-restart",  # tests/restart/test_restart_catchup.py
    "S3ntinel",  # tests/reliability/test_secret_leaks.py (its password begins so)
    "S3ntinel-oauth-",  # OAuth2 access tokens of the oauth2 tests (covered by the above too)
    "cli-admin-s3cret",  # tests/unit/test_cli_config_errors.py
    "cli-db-pw",
    "oauth-cl1ent-s3cret",  # tests/unit/*token_refresh*.py: OAuth2 client secrets
    "S3ntinel-rt",  # refresh tokens there (OAuthTestServer(prefix="S3ntinel-"))
    "S3ntinel-at",  # access tokens there
)

#: tokens shorter than this are not taken as secrets (a test's deliberately broken one)
MIN_ISSUED_CHARS: Final = 8

_produced: list[str] = []
#: request bodies the test backends received during the test
_received: list[str] = []
#: tokens the test servers issued during the test
_issued: set[str] = set()
_sink_id: int | None = None


def _on_issued(secret: str) -> None:
    if len(secret) >= MIN_ISSUED_CHARS:
        _issued.add(secret)


def _on_received(body: bytes) -> None:
    _received.append(body.decode("utf-8", "replace"))


def record(text: str) -> None:
    """Add text a test obtained from the daemon (an HTTP body, a report) to the check."""
    _produced.append(text)


def _sink(message: Any) -> None:
    _produced.append(str(message))


def _ensure_sink() -> None:
    # The CLI's setup_logging() removes every sink; put ours back for each test.
    global _sink_id
    if _sink_id is not None:
        with contextlib.suppress(ValueError):
            logger.remove(_sink_id)
    _sink_id = logger.add(_sink, level="TRACE", format="{message}\n{exception}")


def _leak(texts: list[str], where: str = "the output") -> str | None:
    secrets = (*SENTINELS, *sorted(_issued))
    for text in texts:
        for sentinel in secrets:
            if sentinel in text:
                line = next(li for li in text.splitlines() if sentinel in li)
                return f"test secret {sentinel!r} leaked into {where}: {line[:300]!r}"
    return None


def _patched_readouterr(original: Any) -> Any:
    def readouterr(self: Any) -> Any:
        result = original(self)
        _produced.extend((result.out, result.err))
        return result

    return readouterr


_HEALTH_ROUTES: Final = ("/status", "/metrics", "/healthz", "/readyz")


def _patched_send(original: Any) -> Any:
    """httpx's send, also recording the bodies of the daemon's health routes."""

    async def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        response = await original(self, request, *args, **kwargs)
        if request.url.path in _HEALTH_ROUTES and not kwargs.get("stream"):
            _produced.append(response.text)
        return response

    return send


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    import httpx
    from trio_idle_testing import witness

    if not getattr(witness.issued, "_leak_guard", False):
        witness.watch(_on_issued, _on_received)
        witness.issued._leak_guard = True  # type: ignore[attr-defined]
    if not getattr(httpx.AsyncClient.send, "_leak_guard", False):
        send = _patched_send(httpx.AsyncClient.send)
        send._leak_guard = True
        httpx.AsyncClient.send = send  # type: ignore[method-assign]
    cls = pytest.CaptureFixture
    if not getattr(cls.readouterr, "_leak_guard", False):
        wrapped = _patched_readouterr(cls.readouterr)
        wrapped._leak_guard = True
        cls.readouterr = wrapped  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when == "setup":
        _produced.clear()
        _received.clear()
        _ensure_sink()
    if call.when in ("call", "teardown"):
        # the call's report carries the captured output so far; teardown adds only logs
        texts = [*_produced, report.capstdout, report.capstderr] if call.when == "call" else []
        problem = _leak(texts or list(_produced)) or _leak(_received, "a body the backend received")
        _produced.clear()
        _received.clear()
        if call.when == "teardown":
            _issued.clear()  # kept from setup on: fixtures issue tokens too
        if problem is not None and report.passed:
            report.outcome = "failed"
            report.longrepr = problem
    return report
