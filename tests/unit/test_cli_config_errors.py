"""``trio-idle serve`` with a bad configuration: exit code 2 and one clear line on stderr."""

from __future__ import annotations

from typing import Any

import pytest

from trio_idle import __version__, cli
from trio_idle.core.config import OPTIONS, parse_settings

GOOD_ENV: dict[str, str] = {
    "ADMIN_SECRET": "cli-admin-s3cret",
    "ENCRYPTION_KEY": "k" * 40,
    "DATABASE_URL": "postgresql://u:cli-db-pw@127.0.0.1:9/db",
}


@pytest.fixture(autouse=True)
def _never_start_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a case unexpectedly passed validation, fail fast instead of serving."""

    async def refuse(settings: Any) -> None:
        raise AssertionError(f"configuration was accepted: {settings!r}")

    monkeypatch.setattr(cli, "serve", refuse)
    monkeypatch.setattr(cli, "setup_logging", lambda *a, **k: None)


def run(capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str]) -> str:
    code = cli.main(argv, env)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.endswith("\n")
    assert err.count("\n") == 1, err  # exactly one line
    assert "Traceback" not in err
    assert err.startswith("trio-idle: configuration error: ")
    return err


@pytest.mark.parametrize(
    ("argv", "extra_env", "name"),
    [
        ([], {"TRIO_IDLE_TICK_INTERVAL": "often"}, "TRIO_IDLE_TICK_INTERVAL"),
        (["--tick-interval", "often"], {}, "--tick-interval"),
        ([], {"TRIO_IDLE_REFRESH_INTERVAL": "-5"}, "TRIO_IDLE_REFRESH_INTERVAL"),
        (["--refresh-interval", "0"], {}, "--refresh-interval"),
        ([], {"BACKEND_URL": "ftp://x"}, "BACKEND_URL"),
        (["--backend-url", "http://h:notaport"], {}, "--backend-url"),
        ([], {"TRIO_IDLE_CONNECT_CONCURRENCY": "ten"}, "TRIO_IDLE_CONNECT_CONCURRENCY"),
        (["--key-derivation", "md5"], {}, "--key-derivation"),
        ([], {"ENCRYPTION_KEY": "short"}, "ENCRYPTION_KEY"),
        ([], {"TRIO_IDLE_BACKOFF_INITIAL": "1h"}, "TRIO_IDLE_BACKOFF_INITIAL"),
        (["--source", "ldap"], {}, "--source"),
        ([], {"TRIO_IDLE_HOST_CONNECT_RATES": "gmial=10"}, "TRIO_IDLE_HOST_CONNECT_RATES"),
        (["--host-connect-rates", "gmail=0"], {}, "--host-connect-rates"),
        ([], {"TRIO_IDLE_HOST_PACING": "maybe"}, "TRIO_IDLE_HOST_PACING"),
    ],
)
def test_serve_with_bad_value_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], argv: list[str], extra_env: dict[str, str], name: str
) -> None:
    err = run(capsys, ["serve", *argv], {**GOOD_ENV, **extra_env})
    assert f"configuration error: {name}: " in err


def test_flag_wins_over_bad_env_and_is_what_the_error_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {**GOOD_ENV, "TRIO_IDLE_TICK_INTERVAL": "bad-env"}
    err = run(capsys, ["serve", "--tick-interval", "bad-flag"], env)
    assert "--tick-interval: " in err
    assert "bad-flag" in err
    assert "TRIO_IDLE_TICK_INTERVAL" not in err


@pytest.mark.parametrize("missing", ["ADMIN_SECRET", "ENCRYPTION_KEY", "DATABASE_URL"])
def test_serve_with_missing_secret_exits_2(
    capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    env = {k: v for k, v in GOOD_ENV.items() if k != missing}
    err = run(capsys, ["serve"], env)
    assert f"{missing}: " in err and "required" in err


def test_serve_file_source_without_file(capsys: pytest.CaptureFixture[str]) -> None:
    err = run(capsys, ["serve", "--source", "file"], GOOD_ENV)
    assert "TRIO_IDLE_CONNECTIONS_FILE" in err


def test_config_error_on_stderr_never_shows_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    env = {**GOOD_ENV, "DATABASE_URL": "mysql://u:cli-db-pw@host/db"}
    err = run(capsys, ["serve"], env)
    assert "DATABASE_URL: " in err
    for secret in ("cli-db-pw", "cli-admin-s3cret", "k" * 40):
        assert secret not in err


def test_relation_error_from_flags_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    err = run(capsys, ["serve", "--backoff-initial", "10m"], GOOD_ENV)
    assert "--backoff-initial" in err


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"], {})
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"trio-idle {__version__}"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([], GOOD_ENV) == 2
    assert "serve" in capsys.readouterr().out


def test_every_problem_is_reported_at_once_one_line_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Used to be one problem per start: fix ADMIN_SECRET, restart, then ENCRYPTION_KEY, ...
    env = {
        "ENCRYPTION_KEY": "short",
        "TRIO_IDLE_TICK_INTERVAL": "often",
        "BACKEND_URL": "ftp://x",
        "TRIO_IDLE_BACKOFF_INITIAL": "1h",
    }
    assert cli.main(["serve"], env) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert all(line.startswith("trio-idle: configuration error: ") for line in lines), err
    named = {line.split(": ")[2] for line in lines}
    assert named == {
        "ADMIN_SECRET",
        "ENCRYPTION_KEY",
        "DATABASE_URL",
        "TRIO_IDLE_TICK_INTERVAL",
        "BACKEND_URL",
        "TRIO_IDLE_BACKOFF_INITIAL",
    }, err
    assert len(lines) == len(named)  # one line per problem, none twice
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:cli-db-pw@127.0.0.1:notaport/db",
        "postgresql://u:cli-db-pw@127.0.0.1:99999/db",
        "postgresql://u:cli-db-pw@h1:5432,h2:x/db",
        "postgresql://u:cli-db-pw@[::1/db",
    ],
)
def test_unparsable_database_url_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    # A non-numeric port used to end in a 108-line asyncpg traceback and exit 1.
    err = run(capsys, ["serve"], {**GOOD_ENV, "DATABASE_URL": url})
    assert "DATABASE_URL: expected a postgresql://" in err
    assert "cli-db-pw" not in err


def test_multi_host_database_url_is_accepted() -> None:
    settings = parse_settings(
        {**GOOD_ENV, "DATABASE_URL": "postgresql://u:pw@h1:5432,h2:5433/db?sslmode=require"}
    )
    assert settings.connections.database_url is not None


def _all_commands(parser: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import argparse

    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _all_commands(sub, (*prefix, name))
    return found


COMMANDS = _all_commands(cli.build_parser())


def test_the_command_list_covers_every_subcommand() -> None:
    assert {c[0] for c in COMMANDS if c} >= {"serve", "check", "encrypt", "decrypt", "db", "demo"}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "trio-idle")
def test_help_works_for_every_command(
    capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    # `serve --help` and `check --help` used to crash on a '%' in a help text.
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"], {})
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: trio-idle")
    if command == ("serve",):
        assert "--tick-interval" in out and "TRIO_IDLE_GC" in out
        # every env-only secret is named, from the one declaration of each setting
        secrets = [o.env for o in OPTIONS if o.secret]
        assert "TRIO_IDLE_STATUS_TOKEN" in secrets and "TRIO_IDLE_LISTEN_URL" in secrets
        assert all(env in out for env in secrets), [e for e in secrets if e not in out]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ADMIN_SECRET", "change-me-same-as-the-backend"),
        ("ENCRYPTION_KEY", "change-me-to-the-backends-32-plus-character-key"),
        ("DATABASE_URL", "postgresql://trio_idle:change-me@127.0.0.1:5432/app"),
        ("BACKEND_URL", "http://change-me-to-the-backend:3015"),
    ],
)
def test_env_example_placeholders_are_refused(
    capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    """A known example secret must never go into production."""
    err = run(capsys, ["serve"], {**GOOD_ENV, name: value})
    assert f"configuration error: {name}: is still the 'change-me' placeholder" in err
    assert value not in err
