"""The takeover measurement of docs/scaling.md runs, small and fast (``nox -s scaling``
runs it at full size): real ``trio-idle serve`` processes, one kill; and the one-or-two
processes comparison at 10 sessions."""

from __future__ import annotations

import pytest

from tests.cluster import takeover_bench
from tests.conftest import unavailable
from tests.servers import ServerUnavailable


@pytest.mark.timeout(180)  # ≈ 15 s: processes and their own Postgres
@pytest.mark.postgres
def test_one_kill_with_three_processes_is_taken_over_without_doubles(
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:  # the bench starts its own Postgres
        code = takeover_bench.main(
            ["--kills", "1", "--mailboxes", "30", "--ttl", "3s", "--poll", "1s"]
        )
    except ServerUnavailable as exc:
        unavailable(f"PostgreSQL unavailable: {exc}")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mailboxes watched twice at any server event: 0" in out
    assert "mails appended during a takeover and not scanned: 0" in out
    took = float(out.split("takeover: min ")[1].split("s")[0])
    assert 0 < took < 3 + 1 + 10  # TTL + poll, and room for a loaded machine


@pytest.mark.timeout(180)  # ≈ 10 s: processes and their own Postgres
@pytest.mark.postgres
def test_one_and_two_processes_report_rss_idle_cpu_and_push_latency(
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:  # the bench starts its own Postgres
        code = takeover_bench.main(
            [
                *("--processes", "1,2", "--sessions", "10", "--idle-window", "0.5s"),
                *("--latency-seconds", "1s", "--rate", "10", "--settle", "0.2s"),
                *("--ttl", "3s", "--poll", "1s"),
            ]
        )
    except ServerUnavailable as exc:
        unavailable(f"PostgreSQL unavailable: {exc}")
    out = capsys.readouterr().out
    assert code == 0, out  # every mail appended reached the webhook, on 1 and on 2
    rows = [line for line in out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2, out
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[1].split()[0]) > 0  # RSS grew with the sessions
        assert cells[4].endswith(" ms") and cells[7] == "0", line
