"""The README's run command: ``trio-idle demo`` shows the whole loop and exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(180)  # the demo's own limit is 120 s
def test_demo_runs_the_whole_loop_and_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_idle.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for email in ("alice@demo.test", "bob@demo.test", "carol@demo.test"):
        assert f"[idle/{email}] connected (127.0.0.1:" in out
        assert f"[idle/{email}] exists-event received (new mail)" in out
    assert "[idle/bob@demo.test] scan-triggered → scanned=1 blocked=1" in out
    assert "[idle/file] refreshed — 3 active connections, 3 sessions" in out
    assert "backend scanned 8 messages, blocked and deleted 4" in out
    # the gambling mail filed straight into carol's Junk: the Junk scan carried its
    # envelope and the backend deleted it from Junk
    assert "[idle/carol@demo.test] scan-triggered → scanned=1 blocked=1 (folder Junk)" in out
    junk = [line for line in out.splitlines() if "[demo] backend: carol@demo.test folder" in line]
    assert len(junk) == 1, out[-3000:]
    assert "folder Junk: sinceUid=1 → looked at 1 message(s) (envelopes)" in junk[0]
    assert junk[0].endswith("blocked=1")
    assert "blocked carol@demo.test (Junk): Jackpot! 500 free spins at the casino" in out
    assert "carol@demo.test: 1 message(s) left in INBOX, 0 in Junk" in out
    assert (
        "[demo] folder Junk: the scan of carol@demo.test's Junk folder blocked=1 "
        "(judged by envelopes, deleted from Junk)"
    ) in out
    assert "FAILED" not in out
    # alice's 1,000 old messages cost the backend nothing: each new mail costs one
    alice = [line for line in out.splitlines() if "[demo] backend: alice@demo.test" in line]
    assert len(alice) == 2, out[-3000:]
    assert all("→ looked at 1 message(s) (envelopes)" in line for line in alice)
    assert "sinceUid=1001 " in alice[0] and "sinceUid=1002 " in alice[1]
