"""Whether the backend answers: fed by every request the clients of our backend send
(scans, account health reports, access tokens), read by readiness and the health-check
pings (:mod:`trio_idle.ops.health`)."""

from __future__ import annotations

from typing import Final

import attrs

#: refusals that say the backend rejects this daemon itself (its ``ADMIN_SECRET``)
SECRET_REFUSED: Final = frozenset({401, 403})


def failed_answer(status: int | None) -> bool:
    """Whether an answer with ``status`` (``None``: none, a timeout, an oversized reply)
    counts against the backend being up (pure): no answer, a 5xx or a refusal of
    ``ADMIN_SECRET`` (401/403) do; a 2xx, a 429 (busy but there), a 3xx and other 4xx
    (about this one request) do not."""
    if status is None or status >= 500:
        return True
    return status in SECRET_REFUSED


@attrs.define
class BackendWatch:
    """Whether the backend answers: the start of the current run of failed requests.

    Pure (the caller passes the time). :class:`~trio_idle.backend.client.HttpClient`
    calls :meth:`answered` or :meth:`failed` after every request of a client given this
    watch (the daemon gives the same one to the scan webhook's and the token source's);
    :func:`failed_answer` says which answers are failures. Without requests nothing
    changes: a backend nobody asked is not judged.
    """

    #: since when every request has failed; ``None`` after an answer (or none yet)
    failing_since: float | None = None

    def answered(self) -> None:
        self.failing_since = None

    def failed(self, now: float) -> None:
        if self.failing_since is None:
            self.failing_since = now
