"""reconcile.diff: which connections to start, stop and restart."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures import mail_connection
from trio_idle.accounts.connections import MailConnection
from trio_idle.mailbox.reconcile import diff


def conn(conn_id: str, **changes: Any) -> MailConnection:
    """``changes``: :func:`tests.fixtures.mail_connection`'s keywords."""
    fields: dict[str, Any] = {
        "user_id": f"u-{conn_id}",
        "email": f"{conn_id}@example.com",
        "host": "imap.example.com",
        "password": f"pw-{conn_id}",
    }
    return mail_connection(conn_id, **(fields | changes))


def by_id(*conns: MailConnection) -> dict[str, MailConnection]:
    return {c.id: c for c in conns}


def test_unchanged_list_gives_an_empty_diff() -> None:
    running = by_id(conn("a"), conn("b"))
    d = diff(running, by_id(conn("a"), conn("b")))
    assert d.empty
    assert (d.added, d.removed, d.changed) == ((), (), ())


def test_added_and_removed() -> None:
    d = diff(by_id(conn("a"), conn("b")), by_id(conn("b"), conn("c")))
    assert d.added == ("c",)
    assert d.removed == ("a",)
    assert d.changed == ()
    assert not d.empty


@pytest.mark.parametrize(
    "change",
    [
        {"password": "new-password"},
        {"host": "imap.other.example.com"},
        {"port": 143},
        {"login": "alias@example.com"},
    ],
    ids=["password", "host", "port", "login"],
)
def test_changed_credentials_or_server_restart_the_session(change: dict[str, Any]) -> None:
    d = diff(by_id(conn("a"), conn("b")), by_id(conn("a", **change), conn("b")))
    assert d.changed == ("a",)
    assert d.added == () and d.removed == ()


def test_equal_secret_values_are_not_a_change() -> None:
    # a fresh Secret object with the same value (every refresh decrypts again)
    d = diff(by_id(conn("a")), by_id(conn("a", password="pw-a")))
    assert d.empty


def test_ids_are_sorted_for_stable_logs() -> None:
    ids = ["m", "c", "z", "a", "q", "b"]
    running = by_id(*(conn(i) for i in ids[:3]), conn("x"))
    wanted = by_id(*(conn(i) for i in ids[3:]), conn("x", port=1))
    d = diff(running, wanted)
    assert d.added == ("a", "b", "q")
    assert d.removed == ("c", "m", "z")
    assert d.changed == ("x",)
    assert diff(dict(reversed(running.items())), dict(reversed(wanted.items()))) == d


def test_from_nothing_everything_is_added() -> None:
    d = diff({}, by_id(conn("2"), conn("10"), conn("1")))
    assert d.added == ("1", "10", "2")  # string order, deterministic
