"""A refresh rebuilds only the rows that changed (``ConnectionListBuilder``).

An unchanged row gives the very connection object that runs: not validated or decrypted
again, and the reconciler's diff sees it as unchanged without comparing its fields. A row
with any column changed is built anew, so an edit still restarts its session.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import KEY, row
from trio_idle.accounts import connections
from trio_idle.accounts.connections import ConnectionListBuilder, MailConnection, RowProblem
from trio_idle.core.crypto import derive_key
from trio_idle.mailbox.reconcile import diff

AES_KEY = derive_key(KEY)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the rows validated and decrypted, in order."""
    seen: list[str] = []
    real = connections.build_connection

    def spy(r: Any, key: bytes) -> MailConnection | RowProblem:
        seen.append(str(r.get("id")))
        return real(r, key)

    monkeypatch.setattr(connections, "build_connection", spy)
    return seen


# encrypted once: a table holds the same ciphertext until the password changes
ROWS = [row(f"c{n}", f"u{n}@example.test", f"pw-{n}", 993) for n in range(3)]


def rows() -> list[dict[str, Any]]:
    """The table read again: equal rows in new objects."""
    return [dict(r) for r in ROWS]


def test_unchanged_rows_give_the_running_objects_without_decrypting(builds: list[str]) -> None:
    builder = ConnectionListBuilder(AES_KEY)
    first, _ = builder.build(rows())
    assert builds == ["c0", "c1", "c2"]
    # a new fetch: equal rows in new objects (the source reads them again)
    second, problems = builder.build(rows())
    assert builds == ["c0", "c1", "c2"] and problems == []
    assert all(second[i] is first[i] for i in first)
    assert diff(first, second).changed == () and builder.rows == 3


def test_a_changed_column_is_rebuilt_and_restarts_only_that_connection(
    builds: list[str],
) -> None:
    builder = ConnectionListBuilder(AES_KEY)
    first, _ = builder.build(rows())
    edited = rows()
    edited[1] = row("c1", "u1@example.test", "new-password", 993)
    second, _ = builder.build(edited)
    assert builds[3:] == ["c1"]
    assert second["c1"].password.reveal() == "new-password"
    assert diff(first, second).changed == ("c1",)


def test_rows_none_repeats_the_last_build(builds: list[str]) -> None:
    builder = ConnectionListBuilder(AES_KEY)
    dup = [*rows(), row("c0", "other@example.test", "pw", 993), {"id": "bad"}]
    first, problems = builder.build(dup)
    again, problems_again = builder.build(None)
    assert again == first and list(again) == ["c0", "c1", "c2"]
    assert problems_again == problems
    assert [p.message.split(";")[0] for p in problems][:1] == ["duplicate id"]
    assert len(builds) == 5 and builder.rows == 5


def test_memory_is_the_last_build_only(builds: list[str]) -> None:
    """A row that left the list and comes back is built again: the builder holds the
    digests of the last list, not of every row it ever saw."""
    builder = ConnectionListBuilder(AES_KEY)
    builder.build(rows())
    builder.build(rows()[:1])
    builder.build(rows())
    assert builds == ["c0", "c1", "c2", "c1", "c2"]


def test_identical_duplicate_rows_are_still_reported(builds: list[str]) -> None:
    builder = ConnectionListBuilder(AES_KEY)
    twice = rows()[:1] * 2
    for _ in range(2):
        good, problems = builder.build(twice)
        assert list(good) == ["c0"]
        assert [(p.connection_id, p.message) for p in problems] == [
            ("c0", "duplicate id; keeping the first row")
        ]
    assert builds == ["c0"]


class Hostile(str):
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_rows_that_cannot_be_digested_are_built_every_time(builds: list[str]) -> None:
    builder = ConnectionListBuilder(AES_KEY)
    odd: list[Any] = [row("c0", "u0@example.test", "pw", 993), ["not", "a", "row"]]
    odd[0]["userId"] = Hostile("u-1")
    for _ in range(2):
        good, problems = builder.build(odd)
        assert list(good) == ["c0"]
        assert [p.message for p in problems] == ["not a row: list"]
    assert builds == ["c0", "c0"]


def test_the_digest_keeps_no_secret_in_clear() -> None:
    builder = ConnectionListBuilder(AES_KEY)
    r = rows()[0]
    builder.build([r])
    digest = builder._digest(r)
    assert digest is not None and len(digest) == connections.ROW_DIGEST_BYTES
    # keyed per builder: another process (builder) gives another digest for the same row
    assert ConnectionListBuilder(AES_KEY)._digest(r) != digest
