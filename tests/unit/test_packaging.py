"""The wheel ships the ``trio_idle`` package only (its test kit ``trio_idle.testing`` with it,
the demo uses it): the benchmark harness and the tests stay in the repository."""

from __future__ import annotations

import tomllib
from pathlib import Path

# setuptools ships no type information and its stubs (types-setuptools) are no dependency
from setuptools import find_packages  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_trio_idle_and_its_public_test_kit_only() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert "trio_idle" in packages and "trio_idle.testing" in packages  # the demo uses it
    assert all(p == "trio_idle" or p.startswith("trio_idle.") for p in packages), packages
    assert (REPO / "bench" / "__main__.py").exists()  # the harness lives beside the package
