"""The daemon's wheel holds trio_idle only: the test kit is a distribution of its own
(testkit/, trio-idle-testing), and the benchmark harness and the tests stay in the repository."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

# setuptools ships no type information and its stubs (types-setuptools) are no dependency
from setuptools import find_packages  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_the_daemon_only() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert "trio_idle" in packages
    assert all(p == "trio_idle" or p.startswith("trio_idle.") for p in packages), packages
    assert not any("testing" in p for p in packages), packages
    assert (REPO / "bench" / "__main__.py").exists()  # the harness lives beside the package


def test_the_test_kit_is_its_own_distribution() -> None:
    config = tomllib.loads((REPO / "testkit" / "pyproject.toml").read_text())
    assert config["project"]["name"] == "trio-idle-testing"
    assert "trio-idle" in config["project"]["dependencies"]
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(REPO / "testkit"), include=find["include"])
    assert packages == ["trio_idle_testing"]


def test_demo_without_the_test_kit_says_what_to_install() -> None:
    """A production install has no test kit: ``trio-idle demo`` says so in one line, exit 2."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def block(name, *a, **k):\n"
        "    if name.startswith('trio_idle_testing'):\n"
        "        raise ModuleNotFoundError(name=name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = block\n"
        "from trio_idle.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 2, done.stderr
    assert "needs the test kit" in done.stderr and "./testkit" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
