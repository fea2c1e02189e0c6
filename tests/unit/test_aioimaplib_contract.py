"""The contract between trio-idle and aioimaplib: what the adapter relies on still holds.

:mod:`trio_idle.imap.aioimap` builds aioimaplib's objects without their constructors and
overrides private methods of its parser; :data:`~trio_idle.imap.aioimap.RELIED_ON` lists
every name involved. These tests check each entry against the installed aioimaplib
(present, callable with the parameter names the adapter uses, constructors setting
exactly the attributes the adapter sets itself), then feed real server responses through
the adapter's :class:`~trio_idle.imap.aioimap.ImapProtocol` and check the commands are
filled and closed as the connection expects. A failure names what changed and the
release the adapter was tested with, so whoever raises pyproject.toml's bound knows
where to look.
"""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version
from types import ModuleType
from typing import Any

import aioimaplib
import pytest

from tests.fixtures import Wire
from trio_idle.imap import aioimap
from trio_idle.imap.aioimap import (
    AUTH,
    CONNECTED,
    EXTRA_COMMANDS,
    NONAUTH,
    NOT_SET,
    RELIED_ON,
    SELECTED,
    TESTED_VERSION,
    Command,
    ContinuationCommand,
    ImapProtocol,
    Reliance,
)
from trio_idle.imap.framing import DEFAULT_LIMITS
from trio_idle.imap.push_monitor import PushMonitor


def _owner(module: ModuleType, reliance: Reliance) -> Any:
    if reliance.owner == "aioimaplib":
        return module
    return getattr(module, reliance.owner.rstrip("()"), None)


def _instance_attributes(module: ModuleType, owner: str) -> set[str]:
    """The attributes aioimaplib's own constructor of ``owner`` sets."""
    loop = asyncio.new_event_loop()
    try:
        if owner == "Command()":
            made = module.Command("NOOP", "A1", loop=loop)
        else:
            made = module.IMAP4ClientProtocol(loop)
        return set(vars(made))
    finally:
        loop.close()


def contract_problems(module: ModuleType = aioimaplib) -> list[str]:
    """What of :data:`RELIED_ON` the installed aioimaplib breaks, one line each."""
    problems: list[str] = []
    for reliance in RELIED_ON:
        if reliance.owner.endswith("()"):
            continue
        owner = _owner(module, reliance)
        where = f"aioimaplib.{reliance.name}"
        if reliance.owner != "aioimaplib":
            where = f"aioimaplib.{reliance.owner}.{reliance.name}"
        if owner is None or not hasattr(owner, reliance.name):
            problems.append(f"{where} is missing (used for: {reliance.why})")
            continue
        if reliance.params is None:
            continue
        target = getattr(owner, reliance.name)
        try:
            params = tuple(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            problems.append(f"{where} is no longer a function (used for: {reliance.why})")
            continue
        if params != reliance.params:
            problems.append(
                f"{where} now takes {params}, the adapter uses {reliance.params} "
                f"(used for: {reliance.why})"
            )
    for owner in ("Command()", "IMAP4ClientProtocol()"):
        relied = {r.name for r in RELIED_ON if r.owner == owner}
        try:
            actual = _instance_attributes(module, owner)
        except Exception as exc:  # a changed constructor: say so, do not crash the check
            problems.append(f"aioimaplib.{owner} cannot be made any more: {exc!r}")
            continue
        for name in sorted(actual - relied):
            problems.append(
                f"aioimaplib.{owner} now sets {name}, which the adapter's own constructor "
                "does not (its methods may read it)"
            )
        for name in sorted(relied - actual):
            problems.append(f"aioimaplib.{owner} no longer sets {name}, which the adapter sets")
    return problems


def explain(problems: list[str]) -> str:
    installed = version("aioimaplib")
    return (
        f"the installed aioimaplib {installed} breaks what trio_idle/imap/aioimap.py relies "
        f"on (aioimap.RELIED_ON; tested with aioimaplib {TESTED_VERSION}):\n  "
        + "\n  ".join(problems)
    )


def test_everything_the_adapter_relies_on_is_still_there() -> None:
    problems = contract_problems()
    assert not problems, explain(problems)


async def test_the_adapter_sets_what_aioimaplibs_constructors_would() -> None:
    """Ours skip aioimaplib's constructors: every attribute theirs set must be there, in
    the instance or (a value shared by all, never changed here) in the class."""
    ours: dict[str, object] = {
        "Command()": Command("NOOP", "A1"),
        "IMAP4ClientProtocol()": ImapProtocol(PushMonitor(), DEFAULT_LIMITS),
    }
    for owner, made in ours.items():
        relied = {r.name for r in RELIED_ON if r.owner == owner}
        missing = {
            name for name in relied if not hasattr(made, name) and (owner, name) not in NOT_SET
        }
        assert not missing, f"the adapter's {owner} does not set {sorted(missing)}"


def test_the_installed_release_is_the_tested_series() -> None:
    installed = version("aioimaplib")
    assert installed.split(".")[:2] == TESTED_VERSION.split(".")[:2], explain(
        [f"installed {installed}: outside the tested series (pyproject.toml's bound)"]
    )


@pytest.mark.parametrize(
    ("owner", "name"),
    [("Command", "_reset_timer"), ("IMAP4ClientProtocol", "_untagged_response"), ("", "quoted")],
)
def test_a_renamed_private_name_fails_with_a_message_that_names_it(
    monkeypatch: pytest.MonkeyPatch, owner: str, name: str
) -> None:
    """The plant: aioimaplib renames something the adapter relies on."""
    target = getattr(aioimaplib, owner) if owner else aioimaplib
    monkeypatch.setattr(target, f"{name}_renamed", getattr(target, name), raising=False)
    monkeypatch.delattr(target, name)
    problems = contract_problems()
    message = explain(problems)
    dotted = f"aioimaplib.{owner}.{name}" if owner else f"aioimaplib.{name}"
    assert f"{dotted} is missing" in message
    assert f"tested with aioimaplib {TESTED_VERSION}" in message


def test_a_changed_signature_and_a_new_constructor_attribute_are_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def handle_responses(self: Any, data: bytes, handler: Any, command: Any = None) -> None:
        pass

    monkeypatch.setattr(aioimaplib.IMAP4ClientProtocol, "_handle_responses", handle_responses)
    original = aioimaplib.Command.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._deadline = None

    monkeypatch.setattr(aioimaplib.Command, "__init__", init)
    message = explain(contract_problems())
    assert "aioimaplib.IMAP4ClientProtocol._handle_responses now takes" in message
    assert "aioimaplib.Command() now sets _deadline" in message


# -- the parser still fills the adapter's commands as the connection expects ---------
#
# The tests below run in trio: the push monitor reads its clock.


def connected(state: str = SELECTED) -> tuple[ImapProtocol, PushMonitor, Wire]:
    monitor = PushMonitor()
    protocol = ImapProtocol(monitor, DEFAULT_LIMITS)
    wire = Wire()
    protocol.connection_made(wire)
    assert protocol.state == CONNECTED
    protocol.data_received(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
    assert protocol.greeting == b"* OK [CAPABILITY IMAP4rev1] ready"
    protocol.state = state
    return protocol, monitor, wire


async def test_an_async_command_gets_its_untagged_text_and_the_tagged_result() -> None:
    protocol, _, _ = connected(NONAUTH)
    command = Command("CAPABILITY", protocol.new_tag())
    assert protocol.allows("CAPABILITY")
    protocol.register(command)
    protocol.data_received(b"* CAPABILITY IMAP4rev1 IDLE\r\n")
    assert not command.done
    protocol.data_received(f"{command.tag} OK done\r\n".encode())
    assert command.done and command.result == "OK"
    assert command.lines == [b"IMAP4rev1 IDLE", b"done"], explain(["CAPABILITY lines differ"])


async def test_a_sync_command_keeps_whole_lines_and_literals_and_the_monitor_sees_them() -> None:
    protocol, monitor, _ = connected(AUTH)
    select = Command("SELECT", protocol.new_tag(), "INBOX")
    assert str(select) == f"{select.tag} SELECT INBOX", explain(["Command.__repr__ changed"])
    protocol.register(select)
    protocol.data_received(b"* 3 EXISTS\r\n* OK [UIDNEXT 9] n\r\n" + select.tag.encode())
    protocol.data_received(b" NO [NONEXISTENT] no\r\n")
    assert select.done and select.result == "NO"
    assert select.lines == [b"3 EXISTS", b"OK [UIDNEXT 9] n", b"[NONEXISTENT] no"]
    assert monitor.exists == 3  # every untagged line went through _untagged_response

    protocol.state = SELECTED
    fetch = Command("FETCH", protocol.new_tag(), "1", "(BODY[])", prefix="UID")
    assert str(fetch) == f"{fetch.tag} UID FETCH 1 (BODY[])"
    protocol.register(fetch)
    protocol.data_received(b"* 1 FETCH (UID 4 BODY[] {5}\r\nhello)\r\n")
    protocol.data_received(f"{fetch.tag} OK done\r\n".encode())
    assert fetch.done and fetch.result == "OK"
    assert [bytes(line) for line in fetch.lines] == [
        b"1 FETCH (UID 4 BODY[] {5}",
        b"hello",
        b")",
        b"done",
    ], explain(["a literal is no longer kept between its line's halves"])


async def test_idle_continues_then_its_tag_ends_it_and_pipelined_commands_follow() -> None:
    protocol, monitor, wire = connected()
    idle = protocol.new_idle()
    protocol.register(idle)
    protocol.data_received(b"+ idling\r\n")
    assert protocol.idle_continued and not idle.done, explain(["_continuation: no IDLE event"])
    protocol.data_received(b"* 4 EXISTS\r\n")
    assert monitor.exists == 4 and idle.lines == []  # seen by the monitor, not kept
    noop = Command("NOOP", protocol.new_tag())
    protocol.queued.append(noop)
    protocol.idle_done()
    assert wire.written == b"DONE\r\n"
    protocol.data_received(f"{idle.tag} OK idle done\r\n{noop.tag} OK noop\r\n".encode())
    assert idle.done and idle.result == "OK"
    assert noop.done and noop.result == "OK"  # entered into the table once IDLE ended


async def test_a_continuation_command_answers_each_continuation_once() -> None:
    protocol, _, wire = connected(NONAUTH)

    class Answering(ContinuationCommand):
        def continued(self, line: bytes) -> None:
            protocol.write(b"answer to " + line + b"\r\n")

    command = Answering("AUTHENTICATE", protocol.new_tag(), "PLAIN")
    protocol.register(command)
    protocol.data_received(b"+ \r\n")
    protocol.data_received(b"* OK still\r\n")  # flush() runs again: nothing new to answer
    protocol.data_received(b"+ again\r\n")
    protocol.data_received(f"{command.tag} NO refused\r\n".encode())
    assert wire.written == b"answer to + \r\nanswer to + again\r\n"
    assert command.done and command.result == "NO"


def test_the_commands_the_adapter_adds_are_still_missing_from_aioimaplibs_table() -> None:
    """NOTIFY is entered by the adapter (:data:`EXTRA_COMMANDS`); a release that has its
    own entry takes precedence, which must then be looked at."""
    assert set(EXTRA_COMMANDS).isdisjoint(aioimaplib.Commands), explain(
        [f"aioimaplib now has its own {sorted(set(EXTRA_COMMANDS) & set(aioimaplib.Commands))}"]
    )
    for entry in EXTRA_COMMANDS.values():
        assert isinstance(entry, aioimaplib.Cmd)


async def test_notify_is_a_sync_command_the_parser_closes_and_pushes_reach_the_monitor() -> None:
    protocol, monitor, _ = connected()
    assert protocol.allows("NOTIFY")
    notify = Command("NOTIFY", protocol.new_tag(), "SET", "(selected (MessageNew MessageExpunge))")
    assert str(notify) == f"{notify.tag} NOTIFY SET (selected (MessageNew MessageExpunge))"
    protocol.register(notify)
    assert protocol.pending_sync_command is notify
    protocol.data_received(b'* STATUS "Junk" (MESSAGES 1 UIDNEXT 2)\r\n* 5 EXISTS\r\n')
    protocol.data_received(f"{notify.tag} NO [BADEVENT] not that\r\n".encode())
    assert notify.done and notify.result == "NO"
    assert monitor.exists == 5  # untagged lines during NOTIFY still reach the monitor
    protocol.state = NONAUTH
    assert not protocol.allows("NOTIFY")


async def test_an_unexpected_tag_is_a_dead_connection_not_an_exception() -> None:
    protocol, monitor, wire = connected()
    protocol.data_received(b"Z9 OK who asked\r\n")
    assert wire.closed and monitor.lost is not None
    assert "protocol error: Abort" in monitor.lost


def test_the_adapter_is_the_only_importer() -> None:
    """The import-linter contract covers the package; this guards its one exception."""
    assert vars(aioimap)["aioimaplib"] is aioimaplib
