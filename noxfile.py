"""Developer and CI entry points: ``nox -s tests``, ``nox -s unit``, ``nox -s lint``,
``nox -s typecheck``, ``nox -s docs``, ``nox -s bench``, ``nox -s scaling``.

Every session installs through ``constraints.txt`` (``pip install -c``), so what is tested
is the pinned set a user gets with ``pip install -c constraints.txt .``; ``nox -s lock``
re-resolves it.
"""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

LINT_PATHS = ["trio_idle", "testkit", "bench", "tests", "noxfile.py"]
#: what mypy checks (strict, as ``packages`` in pyproject.toml): the package, its test kit,
#: the benchmark harness beside it and the tests
TYPED_PATHS = ["trio_idle", "testkit/trio_idle_testing", "bench", "tests"]
CONSTRAINTS = "constraints.txt"
#: the test kit, a distribution of its own (the daemon's wheel does not carry it)
TESTKIT = "./testkit"
#: the pins cover the runtime dependencies and these extras, for this Python on Linux
LOCK_EXTRAS = ["test", "bench", "dev"]
LOCK_PYTHON = "3.11"


def _install(session: nox.Session, *args: str) -> None:
    """``pip install`` within the pinned versions of ``constraints.txt``."""
    session.install("-c", CONSTRAINTS, *args)


#: programs the real-server tests need → the Debian package that provides each
SYSTEM_PACKAGES = {
    "dovecot": "dovecot-imapd",
    "systemd-analyze": "systemd",
    # promtool checks and unit-tests deploy/prometheus/; prometheus runs the rules end to end
    "promtool": "prometheus",
    "prometheus": "prometheus",
    # a real browser drives `trio-idle oauth authorize`'s loopback redirect end to end
    "chromium": "chromium",
}


def _ensure_system_packages(session: nox.Session) -> None:
    """Install what the real-server tests need through apt when it is missing."""
    missing = sorted({pkg for prog, pkg in SYSTEM_PACKAGES.items() if not shutil.which(prog)})
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
    _install(session, "-e", ".[test]", "-e", TESTKIT)
    args = session.posargs or ["-q", "-p", "no:cacheprovider"]
    session.run("python", "-m", "pytest", *args)


#: the fast layer: pure logic plus the test kit's own servers; no Dovecot, no PostgreSQL
#: (the test kit's IMAP, scan backend and token endpoint on loopback count as pure here)
UNIT_PATHS = ["tests/unit"]
#: a real-server test in those paths is deselected, not run (e.g. the Postgres cases of
#: tests/unit/test_token_refresh.py, whose SQLite cases run): tests using the ``postgres``,
#: ``pg_dsn``, ``dovecot``, ``dovecot_user`` or ``node_bin`` fixtures are marked by
#: tests/conftest.py
UNIT_MARKERS = "not dovecot and not postgres and not node"


@nox.session
def unit(session: nox.Session) -> None:
    """The fast subset (≈ 15 s, under 30 s): run it on every change; ``nox -s tests`` before
    pushing. Needs no Dovecot, PostgreSQL or Node."""
    _install(session, "-e", ".[test]", "-e", TESTKIT)
    args = session.posargs or ["-q", "-p", "no:cacheprovider"]
    session.run("python", "-m", "pytest", "-m", UNIT_MARKERS, *UNIT_PATHS, *args)


@nox.session
def demo(session: nox.Session) -> None:
    """The whole loop in one process: test IMAP server, keyword-scanning backend, daemon."""
    _install(session, "-e", ".", "-e", TESTKIT)
    session.run("trio-idle", "demo", *session.posargs)


#: the Node + imapflow baseline that ``python -m bench --compare`` runs (package-lock.json)
NODE_BASELINE = "bench/node_baseline"


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (ramp, memory, idle CPU, latency, reconcile, shutdown) → docs/performance.md.

    Default: plaintext at N = 100, 1,000, 10,000, a 10-minute soak at 10,000, the plot
    (≈ 27 min). ``nox -s bench -- --quick`` for a fast run, ``-- --tls --n 100,1000,10000``
    for TLS. Issue 14's figures, trio-idle side by side with the Node + imapflow baseline
    (``npm ci`` installs the baseline first; ≈ 7 min per pair, plus the ramps)::

        nox -s bench -- --compare --n 1000,5000,10000 --security plain,tls --plot
        nox -s bench -- --compare-markdown            # the tables again, from the JSON
        nox -s bench -- --tls --n 10000 --soak-only --soak 7200 [--tracemalloc]

    ``--profile DIR`` installs py-spy into the session first. See ``python -m bench
    --help``. ``bench/`` is a folder of the repository, not part of the installed package:
    run it from the repository root.
    """
    _install(session, "-e", ".[bench]", "-e", TESTKIT)
    if "--profile" in session.posargs:
        _install(session, "py-spy")  # python -m bench refuses --profile without it
    # the Node + imapflow baseline of ``--compare``, exactly as its lock file pins it
    if shutil.which("npm"):
        with session.chdir(NODE_BASELINE):
            session.run("npm", "ci", "--no-audit", "--no-fund", external=True)
    else:
        session.warn("npm not found: `python -m bench --compare` will not run")
    args = session.posargs or ["--n", "100,1000,10000", "--soak", "600", "--plot"]
    session.run("python", "-m", "bench", *args)


@nox.session
def scaling(session: nox.Session) -> None:
    """Takeover after ``kill -9`` → docs/scaling.md: three real ``trio-idle serve``
    processes in shared mode, a throwaway Postgres, the IMAP test server, all on loopback.

    Default: 300 mailboxes, 5 kills, TTL 15 s, poll 5 s (≈ 4 min). Pass your own, e.g.
    ``nox -s scaling -- --kills 10 --mailboxes 3000``; see ``--help``.
    One process or two at the same total of sessions (≈ 6 min):
    ``nox -s scaling -- --processes 1,2 --sessions 2000 --tls``.
    """
    _install(session, "-e", ".[test]", "-e", TESTKIT)
    args = session.posargs or ["--kills", "5", "--mailboxes", "300"]
    session.run("python", "-m", "tests.cluster.takeover_bench", *args)


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate what the docs derive from the code: the settings tables of
    docs/configuration.md (the suite only compares them)."""
    _install(session, "-e", ".")
    session.run("python", "-m", "trio_idle.core.config_doc", "docs/configuration.md")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (rules and format) and the layer contracts of ``[tool.importlinter]``."""
    _install(session, "ruff", "import-linter")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", "trio_idle", "testkit", "bench", "tests")
    # lint-imports reads the package from its source tree, so it needs no install of it
    session.run("lint-imports", env={"PYTHONPATH": os.pathsep.join((os.getcwd(), "testkit"))})


@nox.session
def typecheck(session: nox.Session) -> None:
    _install(session, "-e", ".[test,dev]", "-e", TESTKIT)
    session.run("mypy", *TYPED_PATHS)


@nox.session
def lock(session: nox.Session) -> None:
    """Regenerate constraints.txt with uv: the newest releases pyproject.toml allows.

    ``nox -s lock -- --upgrade-package h11`` moves one package only (the others keep
    their pins). Run ``nox -s tests`` on the result before committing it.
    """
    session.install("uv>=0.5")
    extras = [arg for extra in LOCK_EXTRAS for arg in ("--extra", extra)]
    session.run(
        "uv",
        "pip",
        "compile",
        "pyproject.toml",
        *extras,
        "--python-version",
        LOCK_PYTHON,
        "--python-platform",
        "linux",
        *(session.posargs or ["--upgrade"]),
        "-o",
        CONSTRAINTS,
    )
