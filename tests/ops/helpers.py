"""Small helpers for the ops tests: polling an HTTP endpoint, reading metric samples."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")


async def until(fetch: Callable[[], Awaitable[T]], predicate: Callable[[T], bool]) -> T:
    """Fetch until ``predicate`` holds (HTTP state can only be asked for); bound it with
    ``trio.fail_after``."""
    while not predicate(value := await fetch()):  # noqa: ASYNC110 - polling a remote endpoint
        await trio.sleep(0.05)
    return value


def answer(client: httpx.AsyncClient, path: str) -> Callable[[], Awaitable[httpx.Response | None]]:
    """A fetch for :func:`until`: ``GET path``, ``None`` while the port does not answer yet."""

    async def fetch() -> httpx.Response | None:
        try:
            return await client.get(path)
        except httpx.TransportError:
            return None

    return fetch


def sample(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with exactly ``labels`` in a Prometheus text body."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise KeyError(f"{name}{labels} not in the metrics")
