"""A command that fails names the cause, not the nursery's exception group around it."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator

import loguru
import pytest
import trio

from trio_idle import cli
from trio_idle.core import logs


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.setup_logging("DEBUG", "text", stream)
    yield stream
    loguru.logger.remove()
    loguru.logger.add(sys.stderr)


async def _fails_in_a_nursery() -> None:
    async def boom() -> None:
        raise ConnectionRefusedError("connect to 127.0.0.1:9 refused")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(boom)


def test_an_error_inside_nested_nurseries_is_named(log: io.StringIO) -> None:
    async def nested() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(_fails_in_a_nursery)

    assert cli._run_trio(nested, "check") == cli.EXIT_FAILURE
    lines = log.getvalue().splitlines()
    assert lines[0].endswith(
        "ERROR   [idle/check] failed: ConnectionRefusedError: connect to 127.0.0.1:9 refused"
    )
    assert "ExceptionGroup" not in log.getvalue()
    # DEBUG: where it was raised
    assert "DEBUG   [idle/check] ConnectionRefusedError at " in lines[1]
    assert "boom" in lines[1]


def test_several_errors_are_all_named(log: io.StringIO) -> None:
    async def two() -> None:
        async def fail(text: str) -> None:
            raise ValueError(text)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail, "first")
            nursery.start_soon(fail, "second")

    assert cli._run_trio(two, "db") == cli.EXIT_FAILURE
    first = log.getvalue().splitlines()[0]
    assert "[idle/db] failed: ValueError: " in first
    assert "ValueError: first" in first and "ValueError: second" in first


def test_keyboard_interrupt_is_not_swallowed() -> None:
    async def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli._run_trio(interrupted, "check")
