"""How the folders beside INBOX are watched (``TRIO_IDLE_FOLDER_WATCH``, a row's
``imapFolderWatch``, a file entry's ``folder_watch``) and the connection cap, pure; and the
one warning a bad row value costs (the row keeps running, with ``status``)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.fixtures import ROW_KEY, connection_row
from tests.harness import ListSource, capture_logs, make_settings, row, running_daemon
from trio_idle.accounts.connections import MailConnection, build_connection
from trio_idle.accounts.providers import preset_named
from trio_idle.accounts.source_file import rows_from_toml
from trio_idle.core.config import DEFAULT_QUERY, ConfigError, parse_settings
from trio_idle.imap.folders import mailbox_arg
from trio_idle.mailbox.folders import split_connections

BASE_ENV = {
    "ADMIN_SECRET": "adm1n-s3cret-VALUE",
    "ENCRYPTION_KEY": "0123456789abcdef0123456789abcdef-key",
    "DATABASE_URL": "postgresql://app:pw@db.internal:5432/mail",
}


def test_the_default_is_status_and_idle_is_accepted_in_any_case() -> None:
    assert parse_settings(BASE_ENV).imap.folder_watch == "status"
    env = BASE_ENV | {"TRIO_IDLE_FOLDER_WATCH": " IDLE "}
    assert parse_settings(env).imap.folder_watch == "idle"


def test_a_bad_setting_is_one_line_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(BASE_ENV | {"TRIO_IDLE_FOLDER_WATCH": "push"})
    (line,) = caught.value.lines()
    assert line.startswith("TRIO_IDLE_FOLDER_WATCH: expected one of status, idle")


def _row(**changes: Any) -> dict[str, Any]:
    return connection_row(imapUser=None) | changes


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, None), ("", None), (" ", None), ("idle", "idle"), ("Status", "status")],
)
def test_a_row_may_choose_its_own_mode(value: object, mode: str | None) -> None:
    conn = build_connection(_row(imapFolderWatch=value), ROW_KEY)
    assert isinstance(conn, MailConnection)
    assert conn.folder_watch == mode and conn.warnings == ()


@pytest.mark.parametrize("value", ["push", 1, ["idle"]])
def test_a_bad_row_value_falls_back_to_status_with_a_warning_naming_the_column(
    value: object,
) -> None:
    conn = build_connection(_row(imapFolderWatch=value), ROW_KEY)
    assert isinstance(conn, MailConnection), "the row must not be skipped"
    assert conn.folder_watch == "status"
    (warning,) = conn.warnings
    assert warning.startswith("imapFolderWatch: expected one of status, idle")
    assert "\n" not in warning


def test_a_changed_mode_restarts_the_connection() -> None:
    idle = build_connection(_row(imapFolderWatch="idle"), ROW_KEY)
    status = build_connection(_row(), ROW_KEY)
    assert idle != status


def test_the_toml_entry_folder_watch_reaches_the_row() -> None:
    data = {
        "connection": [
            {
                "id": "a",
                "email": "a@x.test",
                "imap_host": "imap.x.test",
                "password_env": "X",
                "folder_watch": "idle",
            }
        ]
    }
    (entry,) = rows_from_toml(data, {"X": "pw"})
    conn = build_connection(entry, ROW_KEY)
    assert isinstance(conn, MailConnection) and conn.folder_watch == "idle"


def test_the_default_query_reads_the_optional_column() -> None:
    assert "'imapFolderWatch' AS \"imapFolderWatch\"" in DEFAULT_QUERY


# -- the connection cap ---------------------------------------------------------------

FOLDERS = ("[Gmail]/Spam", "Archive", "Sent")


def test_status_mode_polls_every_folder() -> None:
    split = split_connections(FOLDERS, idle=False, max_connections=15)
    assert split.own == () and split.polled == FOLDERS and not split.capped


def test_idle_mode_without_a_published_limit_gives_every_folder_its_own() -> None:
    split = split_connections(FOLDERS, idle=True, max_connections=None)
    assert split.own == FOLDERS and split.polled == () and not split.capped


@pytest.mark.parametrize(
    ("limit", "own"), [(1, ()), (2, FOLDERS[:1]), (3, FOLDERS[:2]), (4, FOLDERS), (15, FOLDERS)]
)
def test_the_mailbox_and_its_folders_stay_within_the_limit(
    limit: int, own: tuple[str, ...]
) -> None:
    split = split_connections(FOLDERS, idle=True, max_connections=limit)
    assert split.own == own and split.own + split.polled == FOLDERS
    assert 1 + len(split.own) <= limit and split.capped == (len(own) < len(FOLDERS))


def test_gmails_preset_allows_15_connections() -> None:
    assert preset_named("gmail").max_connections == 15
    assert preset_named(None).max_connections is None


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        ("INBOX", "INBOX"),
        ("[Gmail]/Spam", "[Gmail]/Spam"),
        ("Junk E-mail", '"Junk E-mail"'),
        ('a"b\\c', '"a\\"b\\\\c"'),
    ],
)
def test_a_mailbox_name_is_quoted_where_it_must_be(name: str, arg: str) -> None:
    assert mailbox_arg(name) == arg


# -- a bad row value: one warning, counted, the row runs --------------------------------


async def test_a_bad_row_value_is_warned_about_once_and_the_row_still_runs() -> None:
    bad = row("c1", "a@example.test", "a-long-password-1", 9) | {"imapFolderWatch": "push"}
    source = ListSource([bad])
    with capture_logs("WARNING") as logs:
        async with running_daemon(make_settings("http://127.0.0.1:9"), source) as daemon:
            with trio.fail_after(10):
                await daemon.wait_refreshed(after=0)
                for after in (1, 2):
                    daemon.request_refresh()
                    await daemon.wait_refreshed(after=after)
                assert "c1" in daemon.reconciler.handles
                assert daemon.reconciler.handles["c1"].conn.folder_watch == "status"
                assert daemon.stats.get("row_values_ignored") == 1
                assert daemon.stats.get("rows_skipped") == 0
    (warning,) = logs.matching("imapFolderWatch")
    assert "connection c1" in warning and "'push'" in warning
