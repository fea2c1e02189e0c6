"""The file source tells the refresh when nothing changed (``FileSource.fetch_changed``).

An unchanged file is read and hashed, not parsed; a changed byte, or a changed value of an
environment variable a row reads its password from, gives the rows again. A version the
source did not give last (another source's, a stale one) always gives the rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trio_idle.accounts import source_file
from trio_idle.accounts.source_file import FileSource
from trio_idle.core.errors import SourceError

TOML = (
    '[[connection]]\nid = "c1"\nemail = "a@example.test"\npassword_env = "A_PW"\n'
    '[[connection]]\nid = "c2"\nemail = "b@example.test"\nactive = false\n'
)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    real = source_file.rows_from_toml

    def spy(*args: Any) -> Any:
        seen.append(1)
        return real(*args)

    monkeypatch.setattr(source_file, "rows_from_toml", spy)
    return seen


async def test_an_unchanged_file_is_not_parsed_again(tmp_path: Path, parses: list[int]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    source = FileSource(str(path), {"A_PW": "one"})
    answer = await source.fetch_changed(None)
    assert answer is not None
    version, rows = answer
    assert [r["id"] for r in rows] == ["c1"] and rows[0]["password"] == "one"
    assert await source.fetch_changed(version) is None
    assert len(parses) == 1


async def test_an_edit_gives_the_rows_again(tmp_path: Path, parses: list[int]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    source = FileSource(str(path), {"A_PW": "one"})
    first = await source.fetch_changed(None)
    assert first is not None
    path.write_text(TOML.replace("active = false", "active = true"))
    second = await source.fetch_changed(first[0])
    assert second is not None and [r["id"] for r in second[1]] == ["c1", "c2"]
    assert second[0] != first[0]
    assert await source.fetch_changed(second[0]) is None


async def test_a_changed_password_variable_gives_the_rows_again(
    tmp_path: Path, parses: list[int]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    env = {"A_PW": "one", "UNRELATED": "x"}
    source = FileSource(str(path), env)
    first = await source.fetch_changed(None)
    assert first is not None
    env["UNRELATED"] = "y"  # no row reads it
    assert await source.fetch_changed(first[0]) is None
    env["A_PW"] = "two"
    second = await source.fetch_changed(first[0])
    assert second is not None and second[1][0]["password"] == "two"
    del env["A_PW"]
    third = await source.fetch_changed(second[0])
    assert third is not None and third[1][0]["password"] is None
    assert len(parses) == 3


async def test_a_version_it_did_not_give_last_gives_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    other = FileSource(str(path), {"A_PW": "one"})
    theirs = await other.fetch_changed(None)
    source = FileSource(str(path), {"A_PW": "one"})
    assert theirs is not None
    # another source's version (another key): not trusted
    assert await source.fetch_changed(theirs[0]) is not None
    mine = await source.fetch_changed(None)
    assert mine is not None and await source.fetch_changed(b"\0" * 16) is not None
    # the same file and variables give the same version again
    assert await source.fetch_changed(mine[0]) is None


async def test_errors_are_the_same_as_fetch(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[[connection]\n")
    source = FileSource(str(path), {})
    with pytest.raises(SourceError, match="is not valid TOML"):
        await source.fetch_changed(None)
    with pytest.raises(SourceError, match="cannot read"):
        await FileSource(str(tmp_path / "missing.toml"), {}).fetch_changed(None)
