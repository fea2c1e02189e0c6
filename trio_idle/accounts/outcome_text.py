"""How a connection's outcomes become text: the one place, with the connection's secrets.

A session's failures (an :class:`~trio_idle.core.errors.ImapError`, a
:class:`~trio_idle.accounts.credentials.TokenUnavailable`, a bug) quote the server, and a server
can quote what we sent it: the password, the refresh token, the access token in use or
the one it replaced. Their text reaches many readers — the log, ``last_error`` in
``/status``, the account health message POSTed to the backend and shown in ``/status``,
the ``check --login`` table, the health reason counted in ``/metrics`` — and every one of
them gets it from here:

- :class:`ConnectionSecrets` is one connection's secret set: its password and refresh
  token, and the access tokens its session signed in with (:meth:`~ConnectionSecrets.use_token`:
  the current one and the previous one, since a server may quote the token it just
  refused after a fresh one was fetched). :meth:`~ConnectionSecrets.scrub` masks all of
  them (:mod:`trio_idle.core.scrub`: every spelling, control characters escaped, cut).
- :meth:`ConnectionSecrets.failure` turns an exception into a :class:`Failure`: its
  shown ``text`` and, for a refused login, the server's own words, both scrubbed with the
  whole set, plus the exception's machine-readable fields (not the exception). The
  session logs ``text``, stores it as ``last_error`` and hands the :class:`Failure` to
  the account health, which classifies it from those alone.

Pure: no I/O. One :class:`ConnectionSecrets` per session run (a credentials change
starts a new session with the new row's secrets); not shared between tasks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import attrs

from trio_idle.accounts.connections import AUTH_PASSWORD, MailConnection
from trio_idle.accounts.credentials import TokenUnavailable
from trio_idle.core.errors import ImapAuthError, ImapError
from trio_idle.core.scrub import DEFAULT_LIMIT, Scrubber, weakly_masked

#: what a :class:`Failure` was: a refused login, no access token, a failed connection,
#: anything else (a bug)
REFUSED: Final = "refused"
NO_TOKEN: Final = "no_token"
CONNECTION: Final = "connection"
OTHER: Final = "other"


@attrs.frozen
class Failure:
    """One failed attempt as it may be shown, and what the account health needs of it.

    ``text``: the exception's message, scrubbed of every secret of the connection;
    ``server_text``: for a refused login the server's own words (scrubbed the same way),
    else ``None``. The rest are the exception's machine-readable fields: ``what`` (one of
    :data:`REFUSED`, :data:`NO_TOKEN`, :data:`CONNECTION`, :data:`OTHER`), the
    :class:`~trio_idle.core.errors.ImapError`'s ``kind``, the
    :class:`~trio_idle.accounts.credentials.TokenUnavailable`'s ``reason``, a refused token's
    ``sasl_status``. The exception itself is not kept: its text may hold a secret, and its
    traceback the frames (and the connection) of a session that has ended.
    """

    text: str
    what: str = OTHER
    server_text: str | None = None
    kind: str | None = None
    token_reason: str | None = None
    sasl_status: str | None = None

    @property
    def words(self) -> str:
        """What the server said (a refused login), else :attr:`text`; scrubbed."""
        return self.server_text if self.server_text is not None else self.text


class ConnectionSecrets:
    """One connection's secrets and the one way its outcomes become text (see the module
    docstring). Cheap to make; the scrubber is rebuilt only when a new token is used."""

    __slots__ = ("_fixed", "_limit", "_scrubber", "_tokens")

    def __init__(self, secrets: Iterable[str | None] = (), *, limit: int = DEFAULT_LIMIT) -> None:
        self._fixed = tuple(s for s in secrets if s)
        self._limit = limit
        #: the current access token first, then the one before it
        self._tokens: tuple[str, ...] = ()
        self._scrubber: Scrubber | None = None

    @classmethod
    def of(cls, conn: MailConnection, *extra: str | None) -> ConnectionSecrets:
        """The set of ``conn``: its password and refresh token, and ``extra`` secrets
        (e.g. a client secret of the token request)."""
        refresh = conn.refresh_token.reveal() if conn.refresh_token is not None else None
        return cls((conn.password.reveal(), refresh, *extra))

    def use_token(self, token: str) -> None:
        """The session signs in with ``token`` now: masked from here on, together with
        the token it replaces (a server may still quote that one)."""
        if not token or (self._tokens and self._tokens[0] == token):
            return
        self._tokens = (token, *self._tokens[:1])
        self._scrubber = None

    def _current(self) -> Scrubber:
        if self._scrubber is None:
            self._scrubber = Scrubber((*self._fixed, *self._tokens), limit=self._limit)
        return self._scrubber

    def scrub(self, text: object, limit: int | None = None) -> str:
        """``text`` (anything; ``str()``-ed) safe to show: every secret of the set masked,
        one printable line, at most ``limit`` characters."""
        return self._current().scrub(text, limit)

    __call__ = scrub

    def failure(self, error: BaseException, limit: int | None = None) -> Failure:
        """``error`` as it may be shown (see :class:`Failure`)."""
        text = self.scrub(error, limit)
        if isinstance(error, TokenUnavailable):
            return Failure(text, NO_TOKEN, token_reason=error.reason)
        if isinstance(error, ImapAuthError):
            said = error.server_text
            return Failure(
                text,
                REFUSED,
                server_text=None if said is None else self.scrub(said, limit),
                kind=error.kind,
                sasl_status=error.sasl_status,
            )
        if isinstance(error, ImapError):
            return Failure(text, CONNECTION, kind=error.kind)
        return Failure(text)


def weak_password_ids(conns: Iterable[MailConnection]) -> list[str]:
    """The ids of password connections whose password is too short to mask safely in
    server text (:func:`trio_idle.core.scrub.weakly_masked`): shown once at start and by
    ``check`` so an operator knows; the password is still masked where it stands alone."""
    return [c.id for c in conns if c.auth == AUTH_PASSWORD and weakly_masked(c.password.reveal())]
