"""Writing the refresh token into one entry of the connections file
(trio_idle/accounts/source_file_edit.py): every other byte kept, the result proven by a
re-parse, odd layouts refused, the replacement atomic."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from trio_idle.accounts.source_file import rows_from_toml
from trio_idle.accounts.source_file_edit import (
    EntryEditError,
    find_entry,
    replace_file,
    set_entry_string,
)

KEY = "encrypted_refresh_token"
TOKEN = "00112233445566778899aabbccddeeff:" + "ab" * 16 + ":" + "cd" * 20

FILE = """\
# connections of the office  (operator's comment, kept)
[[connection]]
id = "alice"
email = "alice@example.com"   # Alice
auth = "oauth2"

# Bob is next
[[connection]]
  id   =   'bob'
  email = "bob@example.com"
  auth = "oauth2"
  encrypted_refresh_token = "old:token:here"   # from 2024

[[connection]]
id = "carol"
email = "carol@example.com"
encrypted_password = "aa:bb:cc"
"""


def _set(text: str, entry: str) -> str:
    return set_entry_string(text.encode(), entry, KEY, TOKEN).decode()


def test_missing_key_is_added_after_the_entrys_last_line_and_nothing_else_moves() -> None:
    edited = _set(FILE, "alice")
    expected = FILE.replace(
        'auth = "oauth2"\n\n# Bob', f'auth = "oauth2"\n{KEY} = "{TOKEN}"\n\n# Bob', 1
    )
    assert edited == expected
    rows = {r["id"]: r for r in rows_from_toml(tomllib.loads(edited), {})}
    assert rows["alice"]["encryptedRefreshToken"] == TOKEN
    assert rows["bob"]["encryptedRefreshToken"] == "old:token:here"


def test_existing_key_line_is_rewritten_in_place_keeping_indent_and_comment() -> None:
    edited = _set(FILE, "bob")
    assert edited == FILE.replace(
        '  encrypted_refresh_token = "old:token:here"   # from 2024',
        f'  encrypted_refresh_token = "{TOKEN}"   # from 2024',
    )


def test_indented_entry_gets_an_indented_line_and_crlf_files_stay_crlf() -> None:
    text = '[[connection]]\r\n    id = "d"\r\n    email = "d@example.com"\r\n'
    edited = _set(text, "d")
    assert edited == text + f'    {KEY} = "{TOKEN}"\r\n'


def test_file_without_final_newline() -> None:
    text = '[[connection]]\nid = "e"\nemail = "e@example.com"'
    assert _set(text, "e") == text + f'\n{KEY} = "{TOKEN}"\n'


def test_last_entry_and_sub_tables() -> None:
    edited = _set(FILE, "carol")
    assert edited == FILE + f'{KEY} = "{TOKEN}"\n'
    text = '[[connection]]\nid = "f"\n\n[other]\nx = 1\n'
    assert _set(text, "f") == f'[[connection]]\nid = "f"\n{KEY} = "{TOKEN}"\n\n[other]\nx = 1\n'


@pytest.mark.parametrize(
    ("text", "entry", "why"),
    [
        (FILE, "dave", "no [[connection]] entry with id"),
        ('[[connection]]\nid = "a"\n[[connection]]\nid = "a"\n', "a", "2 entries"),
        ('connection = [{id = "a", email = "a@x"}]\n', "a", "its own [[connection]] table"),
        ("[[connection]\nid = ", "a", "not valid TOML"),
        (
            '[[connection]]\nid = "a"\nencrypted_refresh_token = """\nx"""\n',
            "a",
            "edit it by hand",
        ),
        ('[[connection]]\nid = "a"\n"encrypted_refresh_token" = "x"\n', "a", "by hand"),
    ],
)
def test_refusals(text: str, entry: str, why: str) -> None:
    with pytest.raises(EntryEditError) as caught:
        set_entry_string(text.encode(), entry, KEY, TOKEN)
    assert why in str(caught.value)


def test_an_edit_the_reparse_disagrees_with_is_refused() -> None:
    # a line that looks like a header inside a multi-line string: the line edit would
    # land inside the string, and the re-parse notices
    text = '[[connection]]\nid = "a"\nnote = """\n[fake]\n"""\n'
    with pytest.raises(EntryEditError, match="by hand"):
        set_entry_string(text.encode(), "a", KEY, TOKEN)


def test_find_entry_spans_its_lines() -> None:
    entry = find_entry(FILE.encode(), "bob")
    lines = FILE.splitlines()
    assert lines[entry.start] == "[[connection]]" and lines[entry.start + 1].strip().startswith(
        "id"
    )
    assert entry.table["email"] == "bob@example.com"


def test_replace_file_keeps_mode_and_replaces_a_symlinks_target(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text(FILE)
    real.chmod(0o640)
    link = tmp_path / "connections.toml"
    link.symlink_to(real)
    new = _set(FILE, "alice").encode()
    replace_file(str(link), FILE.encode(), new)
    assert link.is_symlink()
    assert real.read_bytes() == new
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["connections.toml", "real.toml"]


def test_replace_file_refuses_a_file_changed_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "connections.toml"
    path.write_text(FILE + "# edited by someone else\n")
    with pytest.raises(EntryEditError, match="changed"):
        replace_file(str(path), FILE.encode(), _set(FILE, "alice").encode())
    assert path.read_text() == FILE + "# edited by someone else\n"
    assert os.listdir(tmp_path) == ["connections.toml"]  # no temporary file left
