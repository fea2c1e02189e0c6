"""``trio-idle check`` against a real PostgreSQL (and a real Dovecot for ``--login``)."""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from tests.harness import ADMIN_SECRET, KEY, LogCapture, row
from tests.ops.conftest import cli_env, closed_port
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import insert_mail_connections
from trio_idle import cli

OTHER_KEY = "some-other-encryption-key-0123456789abcdef"


def insert(dsn: str, *rows: dict[str, Any]) -> None:
    insert_mail_connections(dsn, *rows)


def table_lines(stdout: str) -> dict[str, str]:
    """``{connection id: whole table line}`` from the check output."""
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["ID", "EMAIL", "HOST:PORT", "RESULT"], stdout
    return {line.split()[0]: line for line in lines[1:-1]}


@pytest.mark.timeout(120)  # its own 60 s limit must fire first, with its message
async def test_check_login_as_a_process(pg_dsn: str, dovecot: DovecotServer) -> None:
    good = dovecot.new_user("chk")
    dead_port = closed_port()
    await trio.to_thread.run_sync(
        lambda: insert(
            pg_dsn,
            row("good", good.email, good.password, dovecot.plain_port),
            row("undecryptable", "x@example.test", "pw-x", dovecot.plain_port, key=OTHER_KEY),
            row("badhost", "y@example.test", "pw-y-secret", dead_port),
        )
    )
    env = cli_env(
        DATABASE_URL=pg_dsn,
        ADMIN_SECRET=ADMIN_SECRET,
        ENCRYPTION_KEY=KEY,
        TRIO_IDLE_CONNECT_TIMEOUT="5s",
    )
    with trio.fail_after(60):
        result = await trio.run_process(
            [
                sys.executable,
                "-m",
                "trio_idle.cli",
                "check",
                "--login",
                "--imap-security",
                "plain",
                "--concurrency",
                "2",
                "--log-format",
                "json",
            ],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 1, out + err
    lines = table_lines(out)
    assert set(lines) == {"good", "undecryptable", "badhost"}
    assert lines["good"].endswith("ok (login)")
    assert good.email in lines["good"] and f"127.0.0.1:{dovecot.plain_port}" in lines["good"]
    assert "FAILED: cannot decrypt encryptedPassword" in lines["undecryptable"]
    assert f"FAILED: connection to 127.0.0.1:{dead_port} refused" in lines["badhost"]
    assert out.strip().splitlines()[-1] == "3 connections: 1 ok, 2 failed"
    # --log-format json: every log line is one JSON object with the plain message
    messages = [json.loads(line)["message"] for line in err.splitlines()]
    assert any(m.startswith("[idle/check] 3 rows from db, 2 usable") for m in messages)
    db_password = urlsplit(pg_dsn).password
    assert db_password
    for secret in (good.password, "pw-x", "pw-y-secret", ADMIN_SECRET, KEY, db_password):
        assert secret not in out + err


@pytest.mark.usefixtures("in_process_cli")
def test_check_without_login_decrypts_only(
    pg_dsn: str, capsys: pytest.CaptureFixture[str], logs: LogCapture
) -> None:
    insert(
        pg_dsn,
        row("a", "a@example.test", "pw-a", closed_port()),
        row("b", "b@example.test", "pw-b", 993, host="imap.example.test"),
    )
    env = cli_env(DATABASE_URL=pg_dsn, ADMIN_SECRET=ADMIN_SECRET, ENCRYPTION_KEY=KEY)
    code = cli.main(["check"], env)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    lines = table_lines(out)
    assert lines["a"].endswith("ok (decrypted)") and lines["b"].endswith("ok (decrypted)")
    assert "imap.example.test:993" in lines["b"]
    assert "pw-a" not in out + err and "pw-b" not in out + err
    # both passwords are too short to mask safely in server text: the operator is told
    assert logs.matching("2 connection(s) have a password shorter than 8 characters (a, b)")


@pytest.mark.usefixtures("in_process_cli")
def test_check_with_an_unreachable_database_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    dsn = f"postgresql://app:db-Secret-pw@127.0.0.1:{closed_port()}/app"
    env = cli_env(
        DATABASE_URL=dsn, ADMIN_SECRET=ADMIN_SECRET, ENCRYPTION_KEY=KEY, TRIO_IDLE_DB_TIMEOUT="5s"
    )
    code = cli.main(["check"], env)
    out, err = capsys.readouterr()
    assert code == 1
    assert out.startswith("connection source (db): FAILED: cannot reach the database")
    assert "db-Secret-pw" not in out + err


def test_check_with_a_config_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    env = cli_env(ADMIN_SECRET=ADMIN_SECRET, ENCRYPTION_KEY=KEY)  # no DATABASE_URL
    assert cli.main(["check"], env) == 2
    assert "configuration error: DATABASE_URL: is required" in capsys.readouterr().err
