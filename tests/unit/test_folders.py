"""Watched folders: the setting, LIST answers as bytes, special uses resolved per server."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures import ROW_KEY, connection_row
from trio_idle.accounts.connections import MailConnection, RowProblem, build_connection
from trio_idle.accounts.source_file import rows_from_toml
from trio_idle.core.config import DEFAULT_QUERY, ConfigError, parse_settings
from trio_idle.core.folders import parse_folders
from trio_idle.imap.folders import ListEntry, list_command_args, parse_list, resolve_folders
from trio_idle.imap.responses import MailboxState
from trio_idle.mailbox.folders import missed_during_visit

BASE_ENV = {
    "ADMIN_SECRET": "adm1n-s3cret-VALUE",
    "ENCRYPTION_KEY": "0123456789abcdef0123456789abcdef-key",
    "DATABASE_URL": "postgresql://app:pw@db.internal:5432/mail",
}


def test_the_default_watches_the_inbox_only() -> None:
    assert parse_settings(BASE_ENV).imap.folders == ("INBOX",)


def test_special_uses_are_canonical_and_inbox_upper_case() -> None:
    assert parse_folders(" inbox , \\junk,Archive/2024 ") == ("INBOX", "\\Junk", "Archive/2024")


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("INBOX,,\\Junk", "empty folder name"),
        ("INBOX,\\Spam", "unknown special-use folder '\\\\Spam'"),
        ("INBOX,\\Junk,\\junk", "listed twice"),
        ('INBOX,Bad"Name', "control character or a quote"),
        ("\\Junk", "must list TRIO_IDLE_MAILBOX (INBOX)"),
    ],
)
def test_a_bad_folder_list_is_one_line_naming_the_variable(value: str, said: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({**BASE_ENV, "TRIO_IDLE_FOLDERS": value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("TRIO_IDLE_FOLDERS")
    assert said in message


DOVECOT_LIST = [
    b'* LIST (\\HasNoChildren) "/" Archive',
    b'* LIST (\\HasNoChildren \\Junk) "/" Junk',
    b'* LIST (\\HasNoChildren \\Sent) "/" "Sent Messages"',
    b"* 5 EXISTS",
    b'* LIST (\\HasNoChildren) "/" INBOX',
    b"A3 OK List completed.",
]
GMAIL_LIST = [
    b'* LIST (\\HasNoChildren) "/" "INBOX"',
    b'* LIST (\\HasChildren \\Noselect) "/" "[Gmail]"',
    b'* LIST (\\All \\HasNoChildren) "/" "[Gmail]/All Mail"',
    b'* LIST (\\HasNoChildren \\Junk) "/" "[Gmail]/Spam"',
    b'* LIST (\\HasNoChildren) "/" "Quoted \\"name\\""',
]


def test_list_lines_give_names_attributes_and_delimiters() -> None:
    entries = parse_list(DOVECOT_LIST)
    assert [e.name for e in entries] == ["Archive", "Junk", "Sent Messages", "INBOX"]
    assert entries[1] == ListEntry("Junk", frozenset({"\\HasNoChildren", "\\Junk"}), "/")
    assert parse_list(GMAIL_LIST)[-1].name == 'Quoted "name"'
    assert parse_list([b"* LIST (\\Noinferiors) NIL Flat"])[0].delimiter is None


def test_list_extended_data_after_the_name_is_ignored() -> None:
    line = b'* LIST (\\Junk) "." "INBOX.Spam" ("CHILDINFO" ("SUBSCRIBED"))'
    assert [e.name for e in parse_list([line])] == ["INBOX.Spam"]


def test_junk_resolves_to_the_folder_marked_junk_on_each_server() -> None:
    assert resolve_folders(("INBOX", "\\Junk"), parse_list(DOVECOT_LIST)).folders == (
        "INBOX",
        "Junk",
    )
    gmail = resolve_folders(("INBOX", "\\Junk"), parse_list(GMAIL_LIST))
    assert gmail.found == {"INBOX": "INBOX", "\\Junk": "[Gmail]/Spam"}
    assert gmail.missing == ()


def test_the_attribute_wins_over_the_provider_names() -> None:
    lines = [b'* LIST () "/" Spam', b'* LIST (\\Junk) "/" "Courrier ind&AOk-sirable"']
    assert resolve_folders(("\\Junk",), parse_list(lines)).folders == ("Courrier ind&AOk-sirable",)


def test_without_the_attribute_the_provider_names_are_tried() -> None:
    unmarked = [b'* LIST () "/" INBOX', b'* LIST () "/" "Junk-E-Mail"']
    assert resolve_folders(("\\Junk",), parse_list(unmarked)).found == {"\\Junk": "Junk-E-Mail"}


def test_what_the_server_lacks_is_missing_and_noselect_is_not_a_folder() -> None:
    lines = [b'* LIST () "/" INBOX', b'* LIST (\\Noselect \\Junk) "/" Junk']
    resolved = resolve_folders(("INBOX", "\\Junk", "Archive"), parse_list(lines))
    assert resolved.folders == ("INBOX",)
    assert resolved.missing == ("\\Junk", "Archive")


def test_a_folder_named_twice_is_watched_once() -> None:
    resolved = resolve_folders(("\\Junk", "Junk"), parse_list(DOVECOT_LIST))
    assert resolved.folders == ("Junk",)


def test_special_use_attributes_are_asked_for_where_list_extended_allows() -> None:
    assert list_command_args(["IMAP4rev1", "LIST-EXTENDED"]) == (
        '""',
        '"*"',
        "RETURN",
        "(SPECIAL-USE)",
    )
    assert list_command_args(["IMAP4rev1", "SPECIAL-USE"]) == ('""', '"*"')


# -- a row's own folders (imapFolders; folders = [...] in the TOML file) ---------------


def _row(**changes: Any) -> dict[str, Any]:
    return connection_row(imapUser=None) | changes


@pytest.mark.parametrize(
    ("value", "folders"),
    [
        (None, None),  # the global TRIO_IDLE_FOLDERS
        ("", None),
        ("INBOX, \\junk", ("INBOX", "\\Junk")),
        (["INBOX", "Archive/2024"], ("INBOX", "Archive/2024")),
        ('["INBOX", "\\\\Junk"]', ("INBOX", "\\Junk")),  # a text[] column through to_jsonb
    ],
)
def test_a_row_may_name_its_own_folders(value: object, folders: tuple[str, ...] | None) -> None:
    conn = build_connection(_row(imapFolders=value), ROW_KEY)
    assert isinstance(conn, MailConnection)
    assert conn.folders == folders


@pytest.mark.parametrize("value", ["INBOX,\\Spam", ["INBOX", "a,b"], "[not json", 42])
def test_a_bad_folder_list_skips_the_row_with_one_line_naming_the_column(value: object) -> None:
    problem = build_connection(_row(imapFolders=value), ROW_KEY)
    assert isinstance(problem, RowProblem)
    assert problem.message.startswith("imapFolders") and "\n" not in problem.message


def test_the_toml_entry_folders_reach_the_row() -> None:
    data = {
        "connection": [
            {"id": "a", "email": "a@gmail.com", "password_env": "X", "folders": ["\\Junk"]}
        ]
    }
    (row,) = rows_from_toml(data, {"X": "pw"})
    conn = build_connection(row, ROW_KEY)
    assert isinstance(conn, MailConnection) and conn.folders == ("\\Junk",)


def test_the_default_query_reads_the_optional_column() -> None:
    assert "'imapFolders' AS \"imapFolders\"" in DEFAULT_QUERY


def test_mail_missed_during_a_visit_is_what_the_select_back_shows_beyond_what_was_known() -> None:
    known = MailboxState(exists=5, uidnext=10, uidvalidity=7)
    # UIDNEXT decides: one expunged and two arrived meanwhile are two
    assert missed_during_visit(known, 5, MailboxState(6, 12, 7)) == 2
    assert missed_during_visit(known, 5, MailboxState(4, 10, 7)) == 0
    # a known UIDNEXT that lagged (an arrival masked by an expunge): more is scanned
    assert missed_during_visit(known, 5, MailboxState(5, 11, 7)) == 1
    # without UIDNEXT the counts are compared
    no_uidnext = MailboxState(exists=5, uidnext=None, uidvalidity=7)
    assert missed_during_visit(no_uidnext, 5, MailboxState(8, None, 7)) == 3
    assert missed_during_visit(no_uidnext, 5, MailboxState(4, None, 7)) == 0
    assert missed_during_visit(no_uidnext, None, MailboxState(8, None, 7)) == 0
    # renumbered: the catch-up decides (None)
    assert missed_during_visit(known, 5, MailboxState(5, 10, 8)) is None
    assert missed_during_visit(None, None, MailboxState(5, 10, 8)) == 0
