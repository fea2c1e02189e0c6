"""The shipped Prometheus files (deploy/prometheus/) checked by Prometheus' own promtool:
the rules are valid, behave as intended on series that reproduce each situation
(``promtool test rules``), each carries a severity and a runbook link into
docs/operations.md that resolves, and a live daemon's /metrics passes ``promtool check
metrics`` with every labelled counter present at 0 from the start."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import trio
from trio_idle_testing.backend import ScanBackend

from tests.harness import ListSource, make_settings, running_daemon
from tests.unit.test_metrics_render import EXPECTED_ZEROS, labelled_counter_series

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "trio-idle.rules.yml"
SCRAPE = ROOT / "deploy" / "prometheus" / "scrape.example.yml"
RULE_TESTS = Path(__file__).resolve().parent / "prometheus" / "trio-idle.rules.test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
SEVERITIES = {"critical", "warning", "info"}


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False
    )


def alerts(text: str) -> dict[str, str]:
    """Alert name → its block of the rules file (the file's own layout: one
    ``- alert:`` item per rule, nothing after the last but rules)."""
    blocks = re.split(r"^      - alert: ", text, flags=re.MULTILINE)[1:]
    return {block.split("\n", 1)[0].strip(): block for block in blocks}


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a document's headings."""
    anchors = set()
    for line in markdown.splitlines():
        if match := re.match(r"^#{1,6} (.+)$", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_promtool_accepts_the_rules_and_the_scrape_example(promtool: Path) -> None:
    rules = run(promtool, "check", "rules", RULES)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # the example loads the rules file beside it
    config = run(promtool, "check", "config", SCRAPE)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout


def test_the_rules_behave_in_each_situation(promtool: Path) -> None:
    """Backend down, database down, all sessions failing, one user's wrong password (no
    page), an empty list (no SessionsDown), loop lag, ...: see the test file."""
    result = run(promtool, "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_rule_has_a_severity_and_a_runbook_that_exists() -> None:
    found = alerts(RULES.read_text())
    assert len(found) >= 10, found.keys()
    anchors = github_anchors(OPERATIONS.read_text())
    tests = RULE_TESTS.read_text()
    for name, block in found.items():
        severity = re.search(r"^\s+severity: (\w+)$", block, re.MULTILINE)
        assert severity and severity.group(1) in SEVERITIES, name
        runbook = re.search(r'^\s+runbook_url: "docs/operations\.md#([\w-]+)"$', block, re.M)
        assert runbook, f"{name}: no runbook_url into docs/operations.md"
        assert runbook.group(1) in anchors, f"{name}: #{runbook.group(1)} is no heading"
        # and each alert is shown firing in at least one promtool test
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tests), name


def test_user_caused_alerts_never_page() -> None:
    """What end users cause is info (or, for a mass failure, warning): never critical."""
    found = alerts(RULES.read_text())
    for name in ("TrioIdleUsersMustAct",):
        assert "severity: info" in found[name]
    assert "severity: critical" not in found["TrioIdleMassAuthFailures"]


async def test_a_fresh_daemons_metrics_pass_promtool_with_every_counter_at_zero(
    promtool: Path, backend: ScanBackend
) -> None:
    # GC python: no after-refresh collection is counted (the first would be a full one)
    settings = make_settings(
        backend.url, TRIO_IDLE_HEALTH_ADDR="127.0.0.1:0", TRIO_IDLE_GC="python"
    )
    async with running_daemon(settings, ListSource()) as daemon:
        assert daemon.supervisor is not None and daemon.supervisor.health_url is not None
        async with httpx.AsyncClient(base_url=daemon.supervisor.health_url) as http:
            with trio.fail_after(10):
                metrics = (await http.get("/metrics")).content
    series = labelled_counter_series(metrics)
    for name, (_label, values) in EXPECTED_ZEROS.items():
        assert series[name] == dict.fromkeys(values, 0.0), name
    checked = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [str(promtool), "check", "metrics"],
            input=metrics,
            capture_output=True,
            timeout=60,
            check=False,
        )
    )
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
