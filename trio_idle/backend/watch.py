"""Whether the backend answers: fed by every request the backend clients send, read by
readiness and the health-check pings (:mod:`trio_idle.ops.health`)."""

from __future__ import annotations

import attrs


@attrs.define
class BackendWatch:
    """Whether the backend answers: the start of the current run of failed requests.

    Pure (the caller passes the time). :mod:`trio_idle.backend.webhook` calls :meth:`answered`
    or :meth:`failed` after every request to the backend (scans, account health
    reports); :func:`trio_idle.backend.webhook.backend_failed` says which answers are failures.
    Without requests nothing changes: a backend nobody asked is not judged.
    """

    #: since when every request has failed; ``None`` after an answer (or none yet)
    failing_since: float | None = None

    def answered(self) -> None:
        self.failing_since = None

    def failed(self, now: float) -> None:
        if self.failing_since is None:
            self.failing_since = now
