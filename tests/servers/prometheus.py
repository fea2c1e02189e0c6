"""Prometheus' own tools for the tests: ``promtool`` and a throwaway ``prometheus``.

Both come from Debian's ``prometheus`` package (``apt-get install -y prometheus``; the
nox ``tests`` session installs it like Dovecot). :class:`PrometheusServer` runs the real
server as a child process, loopback only: it listens on ``127.0.0.1:<port>``, keeps its
data in a temp dir, and its configuration holds nothing but the scrape jobs the test
gives (no alertmanager, no remote write, no service discovery), so it opens no
connection beyond the loopback targets it scrapes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from . import ServerStartError, ServerUnavailable, free_tcp_port, tail

__all__ = ["PrometheusServer", "find_prometheus", "find_promtool"]

_TIMEOUT = 30.0


def _find(name: str) -> Path:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin")
    if path is None:
        raise ServerUnavailable(f"{name!r} not found (install the prometheus package)")
    return Path(path)


def find_promtool() -> Path:
    """``promtool``, or :class:`ServerUnavailable`."""
    return _find("promtool")


def find_prometheus() -> Path:
    """``prometheus``, or :class:`ServerUnavailable`."""
    return _find("prometheus")


class PrometheusServer:
    """``prometheus`` on 127.0.0.1 scraping ``targets`` (``host:port`` on loopback) as
    job ``job`` every ``interval`` seconds, evaluating ``rule_file`` just as often."""

    def __init__(
        self,
        targets: list[str],
        rule_file: Path,
        *,
        job: str = "trio-idle",
        interval: str = "1s",
    ) -> None:
        for target in targets:
            if not target.startswith(("127.0.0.1:", "localhost:", "[::1]:")):
                raise ValueError(f"{target}: the test Prometheus scrapes loopback only")
        self.binary = find_prometheus()
        self.dir = Path(tempfile.mkdtemp(prefix="trio-idle-prometheus-"))
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.dir / "prometheus.log"
        rules = self.dir / "rules.yml"
        rules.write_text(rule_file.read_text())
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]},
            ],
        }
        # JSON is YAML: no YAML library needed
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until ``/-/ready`` answers (:class:`ServerStartError` if not)."""
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    str(self.binary),
                    f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerStartError(f"prometheus exited at start:\n{tail(self.log)}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise ServerStartError(f"prometheus not ready within {_TIMEOUT:g}s:\n{tail(self.log)}")

    def stop(self) -> None:
        """Terminate this server (its own process only) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
