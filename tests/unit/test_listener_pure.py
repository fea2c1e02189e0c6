"""The listener's pure parts: table names, the trigger SQL, the debounce (virtual time)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_idle.cluster.listener import CHANNEL, Debouncer, NotifySql
from trio_idle.core.config import ConfigError, parse_settings

BASE = {"ADMIN_SECRET": "a" * 20, "ENCRYPTION_KEY": "k" * 32, "DATABASE_URL": "postgresql://h/db"}


@pytest.mark.parametrize(
    "name", ['"MailConnection"', "mail_connection", 'public."MailConnection"', '"a""b"']
)
def test_table_names_that_are_accepted(name: str) -> None:
    settings = parse_settings({**BASE, "TRIO_IDLE_NOTIFY_TABLE": name})
    assert settings.cluster.notify_table == name


@pytest.mark.parametrize("name", ['x; DROP TABLE "MailConnection"', "a b", '"open', "1abc"])
def test_table_names_that_are_refused_name_the_variable(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({**BASE, "TRIO_IDLE_NOTIFY_TABLE": name})
    assert str(info.value).startswith("TRIO_IDLE_NOTIFY_TABLE: expected a table name")


def test_listen_url_is_secret_and_off_by_default() -> None:
    assert parse_settings(BASE).cluster.listen_url is None
    url = "postgresql://u:pw-listen-1@127.0.0.1:5432/db"
    settings = parse_settings({**BASE, "TRIO_IDLE_LISTEN_URL": url})
    assert settings.cluster.listen_url is not None
    assert "pw-listen-1" not in repr(settings)


def test_trigger_sql_names_the_table_and_channel() -> None:
    sql = NotifySql('public."Conn"')
    assert 'ON public."Conn"' in sql.install and f"'{CHANNEL}'" in sql.install
    assert "DROP TRIGGER IF EXISTS" in sql.install  # idempotent
    assert sql.remove.count("IF EXISTS") == 2


async def test_debounce_calls_at_once_then_folds_a_burst_into_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[float] = []
    debouncer = Debouncer(lambda: calls.append(trio.current_time()), interval=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(debouncer.run)
        await trio.sleep(0.1)
        start = trio.current_time()
        for _ in range(20):  # a burst of notifications within 0.2 s
            debouncer.poke()
            await trio.sleep(0.01)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert [round(t - start, 2) for t in calls] == [0.0, 0.5]
