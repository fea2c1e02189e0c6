"""The states a session reports (``/status``, ``/readyz``, metrics, ``serve --once``).

Their own module, importing nothing, so that the pure health decisions
(:mod:`trio_idle.ops.health`) can name them without importing the session machinery (and
with it aioimaplib and trio-asyncio).
"""

from __future__ import annotations

from typing import Final

CONNECTING: Final = "connecting"
IDLE: Final = "idle"
POLLING: Final = "polling"
BACKOFF: Final = "backing-off"
AUTH_FAILED: Final = "auth-failed"

#: Every state a session reports, in display order.
SESSION_STATES: Final = (CONNECTING, IDLE, POLLING, BACKOFF, AUTH_FAILED)
#: States in which a mailbox is being watched.
UP_STATES: Final = frozenset({IDLE, POLLING})
