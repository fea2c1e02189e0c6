"""What the test kit's servers hand out and receive, told to whoever watches (a test
suite's leak check).

- :func:`issued`: a secret a test server minted and gave the daemon — an access token
  from :class:`~trio_idle_testing.oauth_server.OAuthTestServer` or the token route of
  :class:`~trio_idle_testing.backend.ScanBackend`, a refresh token of a grant. None of
  them may show up in what the daemon prints, serves or sends.
- :func:`received`: the body of a request :class:`~trio_idle_testing.backend.ScanBackend`
  received (scans, account health reports, token requests): what the daemon told the
  backend, which must hold no secret either.

Watchers are plain callables registered with :func:`watch`; with none registered the
calls cost nothing. Synchronous, never raises into the server (a watcher's error is the
watcher's problem: it propagates, as a test failure should).
"""

from __future__ import annotations

from collections.abc import Callable

_on_issued: list[Callable[[str], None]] = []
_on_received: list[Callable[[bytes], None]] = []


def watch(
    on_issued: Callable[[str], None] | None = None,
    on_received: Callable[[bytes], None] | None = None,
) -> None:
    """Call ``on_issued`` with every secret handed out and ``on_received`` with every
    backend request body from now on (for the life of the process)."""
    if on_issued is not None:
        _on_issued.append(on_issued)
    if on_received is not None:
        _on_received.append(on_received)


def issued(secret: str) -> None:
    """A test server handed ``secret`` to the daemon."""
    for watcher in _on_issued:
        watcher(secret)


def received(body: bytes) -> None:
    """The test backend received a request with this body."""
    for watcher in _on_received:
        watcher(body)
