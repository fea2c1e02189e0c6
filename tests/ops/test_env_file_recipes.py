"""The one settings file, as each documented recipe reads it: systemd (EnvironmentFile=,
the same rules: tests/unit/test_env_file.py), and ``trio-idle --env-file`` for PM2, Docker
and a shell, here as a real process. deploy/env.example works on a host and in the
image, and its placeholders are refused."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.ops.conftest import cli_env
from tests.ops.test_container_files import image_env
from tests.unit.test_env_file import SECRETS, SECRETS_FILE
from trio_idle.core.config import PLACEHOLDER, parse_settings
from trio_idle.core.crypto import decrypt_password, derive_key
from trio_idle.core.env_file import parse_env_file

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "deploy" / "env.example"


def trio_idle(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_idle.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(**env),
        timeout=60,
        check=False,
    )


def test_env_file_carries_secrets_with_dollar_ampersand_hash_quotes_and_spaces(
    tmp_path: Path,
) -> None:
    """``encrypt --env-file``: the token decrypts with the key exactly as written in the
    file, though the environment holds another one (the file wins, like systemd's)."""
    path = tmp_path / "env"
    path.write_bytes(SECRETS_FILE + b"export IGNORED=1\n")
    result = trio_idle(
        "encrypt", "--env-file", str(path), stdin="imap-pw\n", ENCRYPTION_KEY="x" * 40
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert decrypt_password(token, derive_key(SECRETS["ENCRYPTION_KEY"])) == "imap-pw"
    assert "ignoring 'export IGNORED'" in result.stderr
    assert SECRETS["ENCRYPTION_KEY"] not in result.stdout + result.stderr


def test_an_unreadable_env_file_is_a_configuration_error(tmp_path: Path) -> None:
    result = trio_idle("check", "--env-file", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.startswith("trio-idle: configuration error: --env-file ")
    assert result.stderr.count("\n") == 1


def example() -> dict[str, str]:
    parsed = parse_env_file(EXAMPLE.read_bytes())
    assert parsed.ignored == () and parsed.ambiguous_comments == ()
    return parsed.values


def test_env_example_placeholders_are_refused_one_line_each_naming_the_variable(
    tmp_path: Path,
) -> None:
    placeholders = {k for k, v in example().items() if PLACEHOLDER in v}
    assert {"DATABASE_URL", "ADMIN_SECRET", "ENCRYPTION_KEY", "BACKEND_URL"} <= placeholders
    result = trio_idle("check", "--env-file", str(EXAMPLE))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    named = {line.split(": ")[2] for line in lines}
    assert named == placeholders, result.stderr
    assert all(line.startswith("trio-idle: configuration error: ") for line in lines)
    assert "change-me-same-as-the-backend" not in result.stderr  # values are not shown


def filled_in() -> dict[str, str]:
    return {
        k: v.replace(PLACEHOLDER, "filled-in") if PLACEHOLDER in v else v
        for k, v in example().items()
    }


def test_env_example_works_in_the_container() -> None:
    """The image's ENV, then the file (it wins): the health port is reachable through a
    published port, and the backend is not the container's own loopback."""
    settings = parse_settings({**image_env(), **filled_in()})
    assert settings.health.health_addr == ("0.0.0.0", 9310)
    assert not settings.webhook.backend_url.startswith(("http://127.", "http://localhost"))
    assert "NODE_ENV" not in example()


def test_env_example_values_carry_no_trailing_comments() -> None:
    """``A=x  # note`` sets ``x  # note`` under systemd: comments go on their own lines,
    in the commented-out settings too (an operator uncomments them)."""
    for line in EXAMPLE.read_text().splitlines():
        setting = line.lstrip("#").strip()
        if "=" in setting and setting.split("=", 1)[0].isupper() and " " not in setting:
            continue
        if "=" in setting.split(" ", 1)[0] and setting.split("=", 1)[0].isupper():
            raise AssertionError(f"a comment after a value: {line!r}")


def test_every_documented_recipe_uses_trio_idles_env_file() -> None:
    texts = {
        name: (ROOT / name).read_text()
        for name in ("docs/operations.md", "docs/scaling.md", "Dockerfile", "README.md")
    }
    texts["ecosystem"] = (ROOT / "deploy" / "ecosystem.config.js").read_text()
    for name in ("docs/operations.md", "docs/scaling.md", "Dockerfile"):
        assert "--env-file /etc/trio-idle/env" in texts[name], name
    for name, text in texts.items():
        # the old recipe, which mangled secrets with $ or &
        assert "set -a; . /etc/trio-idle/env; set +a" not in text, name
        # `docker run --env-file` (Docker's format) before the image: not a recipe any more
        # commands in code blocks and in comments, continuation lines joined
        uncommented = "\n".join(line.lstrip("#/ ") for line in text.splitlines())
        for line in re.sub(r"\\\n", " ", uncommented).splitlines():
            command = line.split("  # ")[0]
            if command.startswith("docker run") and "--env-file" in command:
                image = [m.start() for m in re.finditer(r" trio-idle(?=\s|$)", command)][-1]
                assert command.index("--env-file") > image, (name, command)
