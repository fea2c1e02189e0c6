"""``trio-idle oauth authorize`` with bad input: exit 2, one line naming the flag (or the
variable), nothing on stdout, no secret echoed, and no sign-in started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trio_idle import cli, oauth_commands

SECRET = "oauth-cl1ent-s3cret-flags"
ENV: dict[str, str] = {
    "ENCRYPTION_KEY": "k" * 40,
    "TRIO_IDLE_GOOGLE_CLIENT_ID": "cid.apps.example",
    "TRIO_IDLE_GOOGLE_CLIENT_SECRET": SECRET,
    "TRIO_IDLE_MICROSOFT_CLIENT_ID": "ms-app-id",
}
ENTRIES = '[[connection]]\nid = "alice"\nemail = "alice@example.com"\nauth = "oauth2"\n'


@pytest.fixture(autouse=True)
def _never_sign_in(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(options: Any, **kwargs: Any) -> int:
        raise AssertionError(f"the flags were accepted: {options!r}")

    monkeypatch.setattr(oauth_commands, "authorize", refuse)
    monkeypatch.setattr(cli, "setup_logging", lambda *a, **k: None)


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str]) -> str:
    code = cli.main(["oauth", "authorize", *argv], env)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and SECRET not in err
    return err


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        ([], {}, "--provider: required: one of google, microsoft"),
        (["--provider", "yahoo"], {}, "--provider:"),
        (["--provider", "google", "--client-secret", "typed-in-argv"], {}, "--client-secret:"),
        (
            ["--provider", "google"],
            {"TRIO_IDLE_GOOGLE_CLIENT_ID": ""},
            "--client-id: required (or set TRIO_IDLE_GOOGLE_CLIENT_ID)",
        ),
        (
            ["--provider", "google"],
            {"TRIO_IDLE_GOOGLE_CLIENT_SECRET": ""},
            "TRIO_IDLE_GOOGLE_CLIENT_SECRET: is required for google",
        ),
        (["--provider", "google", "--token-url", "http://oauth.example/token"], {}, "--token-url:"),
        (["--provider", "google", "--auth-url", "ftp://x/"], {}, "--auth-url:"),
        (
            ["--provider", "google"],
            {"TRIO_IDLE_GOOGLE_TOKEN_URL": "http://oauth.example/token"},
            "TRIO_IDLE_GOOGLE_TOKEN_URL:",
        ),
        (["--provider", "google", "--device"], {}, "--device:"),
        (
            ["--provider", "microsoft", "--device", "--device-url", "http://x.example/"],
            {},
            "--device-url:",
        ),
        (["--provider", "microsoft", "--device-url", "https://x.example/"], {}, "--device-url:"),
        (["--provider", "microsoft", "--device", "--port", "8080"], {}, "--port:"),
        (["--provider", "google", "--port", "http"], {}, "--port:"),
        (["--provider", "google", "--port", "70000"], {}, "--port:"),
        (["--provider", "google", "--wait", "soon"], {}, "--wait:"),
        (["--provider", "google", "--entry", "alice"], {}, "--entry: needs the connections file"),
    ],
)
def test_bad_flag_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], named: str
) -> None:
    err = refused(capsys, argv, {**ENV, **env})
    assert err.startswith(f"trio-idle: oauth authorize: {named}"), err


def test_client_secret_on_the_command_line_is_not_echoed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = refused(capsys, ["--provider", "google", "--client-secret", SECRET], ENV)
    assert "TRIO_IDLE_GOOGLE_CLIENT_SECRET" in err


def test_entry_that_does_not_exist_is_refused_before_signing_in(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "connections.toml"
    path.write_text(ENTRIES)
    env = {**ENV, "TRIO_IDLE_CONNECTIONS_FILE": str(path)}
    err = refused(capsys, ["--provider", "google", "--entry", "bob"], env)
    assert err.startswith("trio-idle: oauth authorize: --entry: ")
    assert 'no [[connection]] entry with id = "bob"' in err
    err = refused(capsys, ["--provider", "google", "--entry", "alice", "--show-token"], env)
    assert "--show-token: cannot be combined with --entry" in err
    missing = {**ENV, "TRIO_IDLE_CONNECTIONS_FILE": str(tmp_path / "nope.toml")}
    err = refused(capsys, ["--provider", "google", "--entry", "alice"], missing)
    assert "--entry: cannot read" in err
    assert path.read_text() == ENTRIES


def test_encryption_key_is_required_unless_the_token_is_shown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: v for k, v in ENV.items() if k != "ENCRYPTION_KEY"}
    err = refused(capsys, ["--provider", "google"], env)
    assert err.startswith("trio-idle: configuration error: ENCRYPTION_KEY")
    started: list[Any] = []

    async def record(options: Any, **kwargs: Any) -> int:
        started.append((options, kwargs["key"]))
        return 0

    monkeypatch.setattr(oauth_commands, "authorize", record)
    assert cli.main(["oauth", "authorize", "--provider", "google", "--show-token"], env) == 0
    ((options, key),) = started
    assert options.show_token and key is None


def test_oauth_without_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["oauth"], ENV)
    out, err_text = capsys.readouterr()
    assert code == 2 and out == ""
    assert err_text.startswith("trio-idle: oauth authorize: oauth: expected an action")
