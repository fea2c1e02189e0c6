"""What one scan POST costs the daemon: client CPU and round trip, three ways, side by side.

``python -m bench.http_cost [--requests 3000] [--rounds 3]`` starts the scan sink
(:class:`~trio_idle_testing.backend.ScanBackend`, the benchmark's) in a child process on
127.0.0.1 and sends it scans one after the other from this process, alternating:

* ``httpx + httpcore``: ``httpx.AsyncClient``'s own transport, through the client (what
  the daemon did before :mod:`trio_idle.backend.http_transport`);
* ``httpx client + ours``: the same client over :class:`TrioHTTPTransport`;
* ``WebhookClient``: what the daemon does now (:class:`~trio_idle.backend.client.HttpClient`,
  ``httpx.Request`` straight to our transport),
  :meth:`~trio_idle.backend.webhook.WebhookClient.send` with a fresh scan each time.

Each row: CPU of this process per request (``time.process_time``, the figure that does
not depend on how busy the machine is) and the round trip p50/p99 (wall clock: the sink's
share included, noisy). Rounds alternate the three, so a busy moment hits all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import trio

from bench.procs import REPO_ROOT
from trio_idle.backend.client import (
    KEEPALIVE_EXPIRY,
    MAX_IDLE_CONNECTIONS,
    USER_AGENT,
    read_capped,
    tls_verify_context,
)
from trio_idle.backend.http_transport import TrioHTTPTransport
from trio_idle.backend.webhook import (
    ATTEMPT_GRACE,
    BackendAuth,
    ScanJob,
    WebhookClient,
    backend_http,
)
from trio_idle.core.secret import Secret

SECRET = "bench-secret"
PATH = "/api/mail/scan-internal"
_SINK = f"""
import sys, trio
from trio_idle_testing.backend import ScanBackend
async def main():
    backend = ScanBackend({SECRET!r})
    async with trio.open_nursery() as nursery:
        url = await nursery.start(backend.serve)
        print(url, flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


def _job() -> ScanJob:
    return ScanJob("c1", None, "bench@example.com", "INBOX", "exists")


@contextlib.asynccontextmanager
async def streamed(
    client: httpx.AsyncClient, method: str, url: str, **options: Any
) -> AsyncIterator[httpx.Response]:
    """``client.stream(...)`` leaving no reference cycle behind (as the daemon's client
    does: the response gets an empty stream once closed), so the comparison is fair."""
    response: httpx.Response | None = None
    try:
        async with client.stream(method, url, **options) as response:
            yield response
    finally:
        if response is not None:
            response.stream = httpx.ByteStream(b"")


def _via_client(client: httpx.AsyncClient, url: str) -> Callable[[], Awaitable[None]]:
    async def one() -> None:
        job = _job()
        body = job.body()
        headers = {"x-admin-secret": SECRET, "content-type": "application/json"}
        headers["x-scan-id"] = job.scan_id
        async with streamed(client, "POST", url, content=body, headers=headers) as response:
            await read_capped(response, 64 * 1024)
            if response.status_code != 200:
                raise RuntimeError(f"sink answered {response.status_code}")

    return one


async def measure(url: str, requests: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    headers = {"user-agent": USER_AGENT, "accept-encoding": "identity"}
    timeout = httpx.Timeout(10.0)
    httpcore_client = httpx.AsyncClient(headers=headers, timeout=timeout)
    ours = TrioHTTPTransport(
        ssl_context=tls_verify_context(),
        max_idle=MAX_IDLE_CONNECTIONS,
        idle_expiry=KEEPALIVE_EXPIRY,
    )
    ours_client = httpx.AsyncClient(headers=headers, timeout=timeout, transport=ours)
    webhook = WebhookClient(
        url,
        BackendAuth("x-admin-secret", Secret(SECRET)),
        backend_http(10.0, 100, grace=ATTEMPT_GRACE),
    )

    async def via_webhook() -> None:
        reply = await webhook.send(_job())
        if reply.scanned is None:
            raise RuntimeError(f"sink answered: {reply.detail}")

    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "httpx + httpcore": _via_client(httpcore_client, url),
        "httpx client + ours": _via_client(ours_client, url),
        "WebhookClient": via_webhook,
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    try:
        for _ in range(rounds):
            for name, one in ways.items():
                for _ in range(100):  # warm: connections, caches
                    await one()
                times = []
                cpu = time.process_time()
                for _ in range(requests):
                    started = time.perf_counter()
                    await one()
                    times.append(time.perf_counter() - started)
                cpu = time.process_time() - cpu
                times.sort()
                results[name].append(
                    {
                        "cpu_us": cpu / requests * 1e6,
                        "p50_us": times[len(times) // 2] * 1e6,
                        "p99_us": times[int(len(times) * 0.99)] * 1e6,
                    }
                )
    finally:
        await httpcore_client.aclose()
        await ours_client.aclose()
        await webhook.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    sink = subprocess.Popen(
        [sys.executable, "-c", _SINK], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout is not None
        url = sink.stdout.readline().strip() + PATH
        results = trio.run(measure, url, args.requests, args.rounds)
    finally:
        sink.terminate()
        sink.wait()
    base = min(r["cpu_us"] for r in results["httpx + httpcore"])
    print(f"{args.requests} sequential scan POSTs per round, {args.rounds} rounds, alternating")
    print(f"{'':<22} {'CPU/request':>12} {'p50':>8} {'p99':>8}   CPU vs httpcore (best rounds)")
    for name, rows in results.items():
        best = min(rows, key=lambda r: r["cpu_us"])
        for row in rows:
            print(
                f"{name:<22} {row['cpu_us']:>9.0f} us {row['p50_us']:>5.0f} us "
                f"{row['p99_us']:>5.0f} us"
                + (f"   {best['cpu_us'] / base:.2f}×" if row is best else "")
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "rounds": results}, f, indent=1)


if __name__ == "__main__":
    main()
