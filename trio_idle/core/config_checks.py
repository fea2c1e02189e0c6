"""The rules between settings: values each fine alone that do not fit together.

:func:`trio_idle.core.config.parse_settings` runs :func:`cross_check` on every value (set
or default, by field name) once each value has been parsed on its own, and turns each
problem into a :class:`~trio_idle.core.config.ConfigError`. Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

#: one problem: the variable or flag it names, and what is wrong with it (one line)
Problem: TypeAlias = tuple[str, str]


def cross_check(values: Mapping[str, Any], label: Callable[[str], str]) -> list[Problem]:
    """Every problem between ``values`` (field name → value, each field present);
    ``label`` names a field as the operator set it (its variable or flag)."""
    problems: list[Problem] = []

    def at_least(small: str, big: str) -> None:
        if values[small] > values[big]:
            problems.append((label(small), f"must not exceed {label(big)} ({values[big]:g}s)"))

    at_least("backoff_initial", "backoff_max")
    at_least("auth_backoff", "auth_backoff_max")
    at_least("scan_retry_initial", "scan_retry_max")
    if values.get("state") == "postgres" and values.get("database_url") is None:
        problems.append((label("state"), "postgres state needs DATABASE_URL"))
    problems += _check_folders(values, label)
    problems += _check_cluster(values, label)
    return problems


def _check_folders(values: Mapping[str, Any], label: Callable[[str], str]) -> list[Problem]:
    """The mailbox the session IDLEs on must be one of the watched folders."""
    folders, mailbox = values.get("folders"), values.get("mailbox")
    if folders is None or mailbox is None:
        return []
    if mailbox not in folders and not (mailbox.upper() == "INBOX" and "INBOX" in folders):
        return [(label("folders"), f"must list {label('mailbox')} ({mailbox})")]
    return []


def _check_cluster(values: Mapping[str, Any], label: Callable[[str], str]) -> list[Problem]:
    """Shared mode: the mailbox state must be shared, and the lease must leave room for
    a missed heartbeat and for LOGOUT before the others take over."""
    if values.get("cluster") != "shared":
        return []
    problems: list[Problem] = []
    if values.get("database_url") is None:
        problems.append((label("cluster"), "shared mode needs DATABASE_URL"))
    if values.get("state") != "postgres":
        problems.append(
            (
                label("cluster"),
                "shared mode needs TRIO_IDLE_STATE=postgres (a moved mailbox catches up "
                "from the shared state)",
            )
        )
    ttl, poll = values["cluster_ttl"], values["cluster_poll"]
    if not poll > 0 or poll * 3 > ttl:
        problems.append(
            (
                label("cluster_poll"),
                f"must be above 0 and at most a third of {label('cluster_ttl')} ({ttl:g}s)",
            )
        )
    if values["logout_timeout"] * 2 >= ttl:
        problems.append(
            (
                label("cluster_ttl"),
                f"must be more than twice {label('logout_timeout')} "
                f"({values['logout_timeout']:g}s): a fenced instance's LOGOUTs end before "
                "the others take over",
            )
        )
    return problems
