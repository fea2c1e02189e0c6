"""Developer and CI entry points: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

LINT_PATHS = ["trio_idle", "tests", "noxfile.py"]


#: programs the real-server tests need → the Debian package that provides each
SYSTEM_PACKAGES = {"dovecot": "dovecot-imapd", "systemd-analyze": "systemd"}


def _ensure_system_packages(session: nox.Session) -> None:
    """Install what the real-server tests need through apt when it is missing."""
    missing = [pkg for prog, pkg in SYSTEM_PACKAGES.items() if not shutil.which(prog)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        session.warn(f"missing {missing} and cannot install them here (needs root and apt-get)")
        return
    session.log(f"installing {' '.join(missing)} through apt-get")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-qq", external=True, env=env)
    session.run("apt-get", "install", "-y", "-qq", *missing, external=True, env=env)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, against real PostgreSQL (pgserver wheel) and real Dovecot."""
    _ensure_system_packages(session)
    session.install("-e", ".[test]")
    args = session.posargs or ["-q", "-p", "no:cacheprovider"]
    session.run("python", "-m", "pytest", *args)


@nox.session
def demo(session: nox.Session) -> None:
    """The whole loop in one process: test IMAP server, keyword-scanning backend, daemon."""
    session.install("-e", ".")
    session.run("trio-idle", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (ramp, memory, idle CPU, latency, reconcile, shutdown) → docs/performance.md.

    Default: plaintext at N = 100, 1,000, 10,000, a 10-minute soak at 10,000, the plot
    (≈ 27 min). ``nox -s bench -- --quick`` for a fast run, ``-- --tls --n 100,1000,10000``
    for TLS; see ``python -m trio_idle.bench --help``.
    """
    session.install("-e", ".[bench]")
    args = session.posargs or ["--n", "100,1000,10000", "--soak", "600", "--plot"]
    session.run("python", "-m", "trio_idle.bench", *args)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", "trio_idle")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy>=1.11")
    session.run("mypy", "trio_idle")
