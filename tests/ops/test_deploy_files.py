"""The deployment files: the systemd unit verifies, the PM2 file loads, env.example parses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import unavailable
from trio_idle.core.config import OPTIONS, Settings

ENV_FILE = "/etc/trio-idle/env"

DEPLOY = Path(__file__).resolve().parent.parent.parent / "deploy"
UNIT = DEPLOY / "trio-idle.service"


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_the_required_settings() -> None:
    s = _unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "EnvironmentFile": "/etc/trio-idle/env",
        "DynamicUser": "yes",
        "StateDirectory": "trio-idle",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
        "LimitNOFILE": "65536",
        "TimeoutStopSec": "15",
        "KillSignal": "SIGTERM",
        "ExecStart": "/usr/local/bin/trio-idle serve",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze not found (apt-get install systemd)")
    script = shutil.which("trio-idle") or str(Path(sys.executable).parent / "trio-idle")
    if not os.access(script, os.X_OK):
        unavailable("the trio-idle script is not installed (pip install -e .)")
    unit = tmp_path / "trio-idle.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/trio-idle", os.path.realpath(script)))
    result = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [line for line in result.stderr.splitlines() if "trio-idle.service" in line]
    assert result.returncode == 0 and problems == [], result.stderr


def test_pm2_ecosystem_file_loads(node_bin: str) -> None:
    code = "const c = require(process.argv[1]);process.stdout.write(JSON.stringify(c.apps[0]))"
    result = subprocess.run(
        [node_bin, "-e", code, str(DEPLOY / "ecosystem.config.js")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    app = json.loads(result.stdout)
    assert app["interpreter"] == "none"
    assert app["autorestart"] is True
    assert app["script"].endswith("trio-idle")
    # the settings file systemd reads, read with its rules (no shell sourcing it)
    assert app["args"] == f"serve --env-file {ENV_FILE}"
    assert _unit_settings()["EnvironmentFile"] == [ENV_FILE]
    # PM2 7 reads no per-app kill_signal (it sends SIGINT): the file must not promise one
    assert "kill_signal" not in app
    # SIGKILL only after a graceful stop: LOGOUTs, closing, the last state flush
    graceful = Settings().process.shutdown_timeout + 10
    assert app["kill_timeout"] >= graceful * 1000
    assert app["kill_timeout"] == int(_unit_settings()["TimeoutStopSec"][0]) * 1000
    ops = (DEPLOY.parent / "docs" / "operations.md").read_text()
    assert "send **SIGINT**" in ops and "pm2 startup" in ops and "pm2-logrotate" in ops


def test_env_example_names_only_known_variables() -> None:
    known = {o.env for o in OPTIONS} | {"PYTHONUNBUFFERED"}
    names = set()
    for line in (DEPLOY / "env.example").read_text().splitlines():
        text = line.lstrip("#").strip()
        if "=" in text and text.split("=", 1)[0].isupper() and " " not in text.split("=")[0]:
            names.add(text.split("=", 1)[0])
    assert names and names <= known, names - known
    assert {"DATABASE_URL", "ADMIN_SECRET", "ENCRYPTION_KEY"} <= names


def test_operations_doc_covers_the_settings_and_log_lines() -> None:
    text = (DEPLOY.parent / "docs" / "operations.md").read_text()
    for option in OPTIONS:
        if option.field in {
            "health_addr",
            "ready_share",
            "max_loop_lag",
            "ping_url",
            "ping_interval",
            "ping_fail_suffix",
        }:
            assert option.env in text, option.env
    for line in (
        "[idle/<email>] connected (host:port)",
        "exists-event received (new mail)",
        "scan-triggered → scanned=N blocked=M",
        "idle renewing (25min threshold)",
        "reconnecting in 5s (attempt 2)",
        "[idle/db] refreshed — N active connections, M sessions",
    ):
        assert line in text, line
    assert "## State and restarts" in text
