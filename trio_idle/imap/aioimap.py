# mypy: disable-error-code="misc"
# (the adapter subclasses untyped aioimaplib classes: mypy sees neither their bases nor the
# instance dict that keeps aioimaplib's own attributes beside our slots)
"""The one place aioimaplib is imported: its parser and command table, without asyncio.

aioimaplib is used for what it is good at — its response parser
(``IMAP4ClientProtocol._handle_responses`` and the handlers it calls) and its command
table (``Commands``) — and for nothing else: no asyncio task, future, event or timer
exists per connection. To get there this module builds aioimaplib's objects without
their constructors and overrides a few of their private methods; everything of
aioimaplib it relies on, public or private, is listed in :data:`RELIED_ON`, and
``tests/unit/test_aioimaplib_contract.py`` checks each entry (and feeds real responses
through :class:`ImapProtocol`) against the installed aioimaplib. pyproject.toml bounds
aioimaplib to the series that test passed with (:data:`TESTED_VERSION`); an import-linter
contract keeps every other module of ``trio_idle`` from importing aioimaplib.

What the rest of the package gets:

- the connection states (:data:`CONNECTED` ... :data:`SELECTED`), :func:`quote`,
  :data:`IMAP_VERSIONS`;
- :class:`Command` (and :class:`CapturedCommand`, :class:`IdleCommand`,
  :class:`ContinuationCommand`): a command the parser fills and closes;
  :attr:`Command.done`, :attr:`Command.result`, :attr:`Command.lines` instead of awaiting
  it;
- :class:`ImapProtocol`: the parser behind our bounded framing
  (:class:`~trio_idle.imap.framing.ResponseFramer`), fed by the session task, every
  untagged line shown to a :class:`~trio_idle.imap.push_monitor.PushMonitor`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

import aioimaplib
import attrs

from trio_idle.imap.framing import (
    FrameError,
    FrameTooLarge,
    ImapLimits,
    ResponseFramer,
    format_size,
)
from trio_idle.imap.push_monitor import PushMonitor

#: the aioimaplib release the contract test and the whole suite ran with (constraints.txt)
TESTED_VERSION: Final = "2.0.3"

#: Lines and literals parsed in one go, at most (plus the rest of the response that
#: crosses it): :meth:`ImapProtocol.parse_some` stops there and the reading task
#: checkpoints before the next batch. Framing and aioimaplib cost ≈ 3 µs of CPU per line
#: or literal (a batch ≈ 1 ms), and one 16 KiB read of one-byte literals holds ~2,000 of
#: them: parsed whole, that held the loop 35-78 ms. Bytes need no bound of their own: a
#: batch holds at most one read plus one response (``max_line + max_literal``).
STEP_PARTS: Final = 256


@attrs.frozen
class Reliance:
    """One thing of aioimaplib this module relies on.

    ``owner`` is ``"aioimaplib"`` (a module attribute), ``"Command"`` or
    ``"IMAP4ClientProtocol"`` (a class attribute or method), or ``"Command()"`` /
    ``"IMAP4ClientProtocol()"`` (an attribute their constructor sets: this module does not
    run those constructors and sets the attributes itself, so aioimaplib's constructor must
    set exactly these). ``params``: for a callable, the parameter names it is called or
    overridden with (``self`` included for methods), checked by the contract test.
    """

    owner: str
    name: str
    why: str
    params: tuple[str, ...] | None = None


_INSTANCE_WHY = "set here without running the constructor (its asyncio parts are not wanted)"

#: Everything of aioimaplib this module uses, reads, sets, calls or overrides.
RELIED_ON: Final[tuple[Reliance, ...]] = (
    # -- module attributes --------------------------------------------------------------
    Reliance("aioimaplib", "STARTED", "state before connection_made"),
    Reliance("aioimaplib", "CONNECTED", "state until the greeting (handled here)"),
    Reliance("aioimaplib", "NONAUTH", "state after an OK greeting"),
    Reliance("aioimaplib", "AUTH", "state after LOGIN/AUTHENTICATE or a PREAUTH greeting"),
    Reliance("aioimaplib", "SELECTED", "state after SELECT"),
    Reliance("aioimaplib", "quoted", "LOGIN's user and password", ("arg",)),
    Reliance("aioimaplib", "int2ap", "the tag prefix", ("num",)),
    Reliance("aioimaplib", "Commands", "command table: exec (sync/async), valid_states"),
    Reliance("aioimaplib", "Exec", "Exec.is_sync: which table slot a command takes"),
    Reliance("aioimaplib", "Cmd", "the entry of a command the table lacks (NOTIFY)"),
    Reliance("aioimaplib", "AllowedVersions", "the IMAP versions CAPABILITY must name"),
    Reliance("aioimaplib", "CONTROL_CHARS", "arguments with NUL, CR or LF are refused"),
    Reliance("aioimaplib", "IncompleteRead", "the parser wanting more of a response"),
    Reliance("aioimaplib", "Command", "base of Command"),
    Reliance("aioimaplib", "IMAP4ClientProtocol", "base of ImapProtocol"),
    # -- Command: what the parser calls on it, what is overridden -----------------------
    Reliance("Command", "__repr__", "the command line written (tag prefix name args)", ("self",)),
    Reliance("Command", "response", "Response(result, lines) once answered"),
    Reliance(
        "Command", "close", "overridden: the parser ends a command", ("self", "line", "result")
    ),
    Reliance("Command", "append_to_resp", "IdleCommand overrides it", ("self", "line", "result")),
    Reliance("Command", "flush", "ContinuationCommand overrides it", ("self",)),
    Reliance("Command", "_set_timer", "overridden: no asyncio timer", ("self",)),
    Reliance("Command", "_reset_timer", "overridden: no asyncio timer", ("self",)),
    Reliance(
        "Command",
        "begin_literal_data",
        "the parser's literal path (reads _expected_size); overridden: makes the buffer",
        ("self", "expected_size", "literal_data"),
    ),
    Reliance("Command", "append_literal_data", "the parser's literal path", ("self", "data")),
    Reliance("Command", "wait_literal_data", "the parser's literal path", ("self",)),
    Reliance("Command", "wait_data", "the parser's literal path", ("self",)),
    Reliance("Command", "_end_literal_data", "overridden: the parser's literal path", ("self",)),
    *(
        Reliance("Command()", name, _INSTANCE_WHY)
        for name in (
            "name",
            "tag",
            "args",
            "prefix",
            "untagged_resp_name",
            "_exception",
            "_loop",
            "_event",  # a class attribute: close() is overridden
            "_timeout",
            "_timer",  # a class attribute: close() is overridden
            "_expected_size",
            "_resp_literal_data",
            "_resp_result",
            "_resp_lines",  # ContinuationCommand reads the continuation lines here
        )
    ),
    # -- IMAP4ClientProtocol ------------------------------------------------------------
    Reliance(
        "IMAP4ClientProtocol",
        "connection_made",
        "sets transport and state CONNECTED",
        ("self", "transport"),
    ),
    Reliance(
        "IMAP4ClientProtocol",
        "_handle_responses",
        "the parser: called with one framed response",
        ("self", "data", "line_handler", "current_cmd"),
    ),
    Reliance(
        "IMAP4ClientProtocol",
        "_handle_line",
        "overridden: the greeting is taken here",
        ("self", "line", "current_cmd"),
    ),
    Reliance(
        "IMAP4ClientProtocol",
        "_untagged_response",
        "overridden: every untagged line reaches the PushMonitor",
        ("self", "line"),
    ),
    Reliance(
        "IMAP4ClientProtocol",
        "_response_done",
        "closes the command a tag answers",
        ("self", "line"),
    ),
    Reliance(
        "IMAP4ClientProtocol",
        "_continuation",
        "overridden for IDLE's + (idle_continued), else flush()es the sync command",
        ("self", "line"),
    ),
    Reliance("IMAP4ClientProtocol", "new_tag", "every command's tag", ("self",)),
    *(
        Reliance("IMAP4ClientProtocol()", name, _INSTANCE_WHY)
        for name in (
            "loop",
            "transport",
            "state",
            "state_condition",  # not set here: only the coroutine API uses it
            "capabilities",
            "pending_async_commands",
            "pending_sync_command",
            "idle_queue",
            "_idle_event",  # a class attribute: _continuation is overridden for IDLE
            "imap_version",
            "literal_data",
            "incomplete_line",
            "current_command",
            "conn_lost_cb",
            "tasks",
            "tagnum",
            "tagpre",
        )
    ),
)

#: instance attributes of aioimaplib's constructors that this module does not set
#: (used only by the coroutine API it does not call)
NOT_SET: Final = frozenset({("IMAP4ClientProtocol()", "state_condition")})

STARTED: Final[str] = aioimaplib.STARTED
CONNECTED: Final[str] = aioimaplib.CONNECTED
NONAUTH: Final[str] = aioimaplib.NONAUTH
AUTH: Final[str] = aioimaplib.AUTH
SELECTED: Final[str] = aioimaplib.SELECTED

#: the IMAP versions a server's CAPABILITY must name (one of)
IMAP_VERSIONS: Final[tuple[str, ...]] = tuple(aioimaplib.AllowedVersions)
_VERSION_NAMES: Final = {version: version for version in IMAP_VERSIONS}


#: commands aioimaplib's table (``Commands``) lacks, as its entries: NOTIFY (RFC 5465) is
#: sync (its untagged answers, if any, belong to it); the table itself is left alone
EXTRA_COMMANDS: Final[dict[str, Any]] = {
    "NOTIFY": aioimaplib.Cmd(
        "NOTIFY", (aioimaplib.AUTH, aioimaplib.SELECTED), aioimaplib.Exec.is_sync
    ),
}


def _entry(name: str) -> Any:
    """The command table's entry for ``name`` (aioimaplib's, else :data:`EXTRA_COMMANDS`)."""
    entry = aioimaplib.Commands.get(name)
    return entry if entry is not None else EXTRA_COMMANDS[name]


def quote(arg: str) -> str:
    """``arg`` as an IMAP quoted string (RFC 3501 §9: ``\\`` and ``"`` escaped)."""
    return str(aioimaplib.quoted(arg))


class _NoLoop:
    """What aioimaplib's ``Command`` needs of an event loop when it has no timeout: a
    ``get_debug()`` for the placeholder handle it makes. Commands here never get an
    aioimaplib timer (deadlines are trio's), so no asyncio loop is involved at all."""

    __slots__ = ()

    def get_debug(self) -> bool:
        return False


_NO_LOOP: Any = _NoLoop()


class _DiscardQueue:
    """Replaces aioimaplib's IDLE queue: the monitor already saw every line."""

    __slots__ = ()

    def put_nowait(self, item: object) -> None:
        pass

    async def put(self, item: object) -> None:
        pass


_DISCARD: Final = _DiscardQueue()


class _NoTimer:
    """A command's timer where there is none (deadlines are trio cancel scopes)."""

    __slots__ = ()

    def cancel(self) -> None:
        pass


_NO_TIMER: Final = _NoTimer()

#: no async command pending (aioimaplib only reads the table then; :meth:`register` makes
#: a dict of the connection's own)
_NO_COMMANDS: Final[Mapping[str, Any]] = MappingProxyType({})


class Command(aioimaplib.Command):
    """aioimaplib's ``Command`` without its asyncio parts: the parser fills and closes it
    as any other; the connection polls :attr:`done` instead of awaiting it.

    ``str(command)`` is its command line (without CRLF). Raises :class:`ValueError` if an
    argument holds NUL, CR or LF (it would end the line: another command)."""

    # aioimaplib's attributes that are the same for every command here are class
    # attributes: the IDLE command lives as long as its connection, and a tick makes two.
    _exception = None
    _loop = _NO_LOOP
    #: aioimaplib's asyncio.Event, set by its close(): :meth:`close` sets ``_done``
    #: instead (nothing waits: the connection checks :attr:`done` after each read)
    _event = None
    _timeout = None
    _timer = _NO_TIMER
    _expected_size = 0
    #: a literal's bytes while it is read; a bytearray of its own from
    #: :meth:`begin_literal_data` (most commands never get a literal)
    _resp_literal_data: bytes | bytearray = b""

    def __init__(
        self,
        name: str,
        tag: str,
        *args: str,
        prefix: str | None = None,
        untagged_resp_name: str | None = None,
    ) -> None:
        for arg in args:  # as aioimaplib: a CR or LF in an argument would end the line
            if arg is not None and aioimaplib.CONTROL_CHARS.search(str(arg)):
                raise ValueError(f"NUL, CR and LF are not allowed in {name} command arguments")
        self.name = name
        self.tag = tag
        self.args = args
        self.prefix = prefix + " " if prefix else None
        self.untagged_resp_name = untagged_resp_name or name
        self._resp_result = "Init"
        self._resp_lines: list[bytes] = []
        self._done = False

    def _set_timer(self) -> None:
        pass

    def _reset_timer(self) -> None:
        pass

    def close(self, line: bytes, result: str) -> None:
        # aioimaplib's close() minus its timer and event (neither exists here)
        self.append_to_resp(line, result=result)
        self._done = True

    def begin_literal_data(self, expected_size: int, literal_data: bytes = b"") -> bytes:
        self._resp_literal_data = bytearray()
        rest: bytes = super().begin_literal_data(expected_size, literal_data)
        return rest

    def _end_literal_data(self) -> None:
        # aioimaplib's makes the next literal's bytearray now: it is made when one begins
        self._expected_size = 0
        self._resp_literal_data = b""

    @property
    def done(self) -> bool:
        """Whether the server has answered (its tagged response was parsed)."""
        return self._done

    @property
    def result(self) -> str:
        """``OK``, ``NO`` or ``BAD`` once :attr:`done` (``Init``/``Pending`` before)."""
        return str(self.response.result)

    @property
    def lines(self) -> list[bytes]:
        """The response lines (untagged lines, literals, the tagged line's text), as the
        parser keeps them: ``* `` stripped; an async command's lines start after its
        name; a literal is a ``bytearray``."""
        lines: list[bytes] = self.response.lines
        return lines


class CapturedCommand(Command):
    """A command whose untagged lines are not kept (:attr:`lines` holds the tagged
    line's text only): the connection reads its answer raw, as framed
    (:attr:`ImapProtocol.capture`). aioimaplib would keep every line and literal as an
    object: an 8 MiB answer of one-byte literals is 2 million of them, hundreds of MiB,
    freed in one go when the command is dropped (≈ 100 ms holding the loop)."""

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        if result != "Pending":
            super().append_to_resp(line, result)


class IdleCommand(CapturedCommand):
    """aioimaplib's ``IdleCommand`` on :class:`Command`: lines while idling are not
    kept (the monitor saw them)."""

    def __init__(self, tag: str) -> None:
        super().__init__("IDLE", tag)


class ContinuationCommand(Command):
    """A command that answers the server's ``+`` continuations: :meth:`continued` is
    called once for each, in order (an exchange such as ``AUTHENTICATE``).

    aioimaplib hands every continuation of the pending sync command to ``flush`` after
    adding it to the response lines, and also calls ``flush`` after every response while
    the command is pending: only a line that has just arrived is a continuation."""

    def __init__(self, name: str, tag: str, *args: str) -> None:
        super().__init__(name, tag, *args)
        self._seen_lines = 0

    def continued(self, line: bytes) -> None:
        """The server sent ``line`` (starting with ``+``). Synchronous; may write."""
        raise NotImplementedError

    def flush(self) -> None:
        if len(self._resp_lines) == self._seen_lines:
            return
        self._seen_lines = len(self._resp_lines)
        line = bytes(self._resp_lines[-1])
        if line.startswith(b"+"):
            self.continued(line)


class CapabilitySets:
    """One frozenset for all connections whose server announced the same capabilities.

    Thousands of connections to one provider hold the same ~20-50 words: shared, that is
    one set (and its strings) instead of one each (≈ 0.4 KiB per connection). The table is
    bounded, as a hostile or odd server could announce a new set on every connection: at
    most ``limit`` sets of at most ``max_words`` words and ``max_chars`` characters are
    kept (worst case ≈ ``limit`` × 20 KiB); past that, or for a larger set, the connection
    gets a private frozenset, as before (counted in :attr:`private`). Never emptied: a
    real deployment sees a handful of distinct sets. Not thread-safe (trio thread).
    """

    __slots__ = ("_sets", "limit", "max_chars", "max_words", "private")

    def __init__(self, limit: int = 64, max_words: int = 128, max_chars: int = 4096) -> None:
        self.limit = limit
        self.max_words = max_words
        self.max_chars = max_chars
        self._sets: dict[frozenset[str], frozenset[str]] = {}
        #: capability sets handed out unshared (table full, or the set too large)
        self.private = 0

    def __len__(self) -> int:
        return len(self._sets)

    def shared(self, words: Iterable[str]) -> frozenset[str]:
        """``words`` as a frozenset: the one already kept for these words if there is
        one, else this one, kept if the table has room and it is not too large."""
        capabilities = frozenset(words)
        known = self._sets.get(capabilities)
        if known is not None:
            return known
        if (
            len(self._sets) >= self.limit
            or len(capabilities) > self.max_words
            or sum(map(len, capabilities)) > self.max_chars
        ):
            self.private += 1
            return capabilities
        self._sets[capabilities] = capabilities
        return capabilities


#: the process's table (tests may replace it)
CAPABILITY_SETS = CapabilitySets()


class ImapProtocol(aioimaplib.IMAP4ClientProtocol):
    """aioimaplib's parser behind our own bounded framing, fed from trio.

    Bytes go through a :class:`~trio_idle.imap.framing.ResponseFramer` first, and
    aioimaplib gets one complete response at a time. Its parser then never holds an
    unfinished line or literal between calls (it would buffer those without limit, and
    re-copy an unfinished line on every read) and recurses only over the lines and
    literals of that one response (thousands of lines in one read ran it out of stack).
    A bound exceeded, or anything else the parser raises, marks the connection dead with
    a one-line reason and closes it.

    Between two responses, the next of the commands written ahead (:attr:`queued`,
    pipelining) is entered into aioimaplib's table once nothing is pending, so each
    response is matched to the command the server is answering.
    """

    # Our own attributes live in slots: aioimaplib's stay in the instance dict, which
    # CPython then keeps key-shared (at most 30 keys). All 32 in the dict made it a
    # combined table: +1.6 KiB per connection (python -m bench.memory_probe).
    __slots__ = (
        "_answer_bytes",
        "_backlog",
        "_lost_seen",
        "_protocol_error",
        "after_parse",
        "capture",
        "closing",
        "framer",
        "greeting",
        "idle_continued",
        "idle_outstanding",
        "limits",
        "monitor",
        "on_answer",
        "parsed_parts",
        "queued",
        "tls_pending",
    )

    # aioimaplib's attributes that never change here are class attributes, shared by all
    # connections (each instance attribute is ≈ 9 bytes in the instance dict per
    # connection, and a set, a bound method or a flag object more beside it):
    loop = _NO_LOOP
    idle_queue = _DISCARD
    #: APPEND's data: no APPEND is sent here
    literal_data = None
    #: aioimaplib's data_received's unfinished line and literal: the framer hands its
    #: parser whole responses (and data_received is ours)
    incomplete_line = b""
    current_command = None
    #: aioimaplib's greeting tasks: _handle_line takes the greeting here, so none is ever
    #: started; immutable, so a path that did add one fails loudly (a protocol error)
    tasks: frozenset[Any] = frozenset()
    #: :meth:`lost` tells the monitor itself (aioimaplib's connection_lost is not called):
    #: no bound method, and no reference cycle, per connection
    conn_lost_cb: Callable[[Exception | None], None] | None = None
    #: aioimaplib sets it at IDLE's ``+``: :meth:`_continuation` sets
    #: :attr:`idle_continued` instead, so no per-connection flag object is needed
    _idle_event = None

    def __init__(self, monitor: PushMonitor, limits: ImapLimits) -> None:
        # Not aioimaplib's __init__: it makes an asyncio Condition, Queue and Event per
        # connection (≈ 2 KiB) for its coroutine API, which is not used here. These and
        # the class attributes above are the attributes its parser reads (RELIED_ON).
        self.transport: Any = None
        self.state = aioimaplib.STARTED
        #: shared with every connection that has the same (:class:`CapabilitySets`)
        self.capabilities: frozenset[str] = frozenset()
        #: aioimaplib's table of async commands; the shared empty one while none is
        #: pending (most of a connection's life: a dict that held one keeps its table)
        self.pending_async_commands: Mapping[str, Command] = _NO_COMMANDS
        self.pending_sync_command: Command | None = None
        self.imap_version: str | None = None
        self.tagnum = 0
        self.tagpre = aioimaplib.int2ap(random.randint(4096, 65535))
        self.monitor = monitor
        self.limits = limits
        self.framer = ResponseFramer(limits.max_line, limits.max_literal)
        self._protocol_error: Exception | None = None
        #: the server's greeting line, once it came (``b""`` once :meth:`take_greeting`)
        self.greeting: bytes | None = None
        #: the server sent ``+`` for the last IDLE of :meth:`new_idle`: it is idling
        self.idle_continued = False
        #: an IDLE was written and no DONE for it yet (LOGOUT must end it first)
        self.idle_outstanding = False
        #: LOGOUT was written: what the server still sends is not parsed
        self.closing = False
        #: STARTTLS was accepted: nothing more is parsed until TLS is up
        self.tls_pending = False
        #: bytes of the answer to the command in progress (aioimaplib keeps them)
        self._answer_bytes = 0
        #: while a list: every untagged response, raw as framed (for the envelope fetch)
        self.capture: list[bytes] | None = None
        #: commands already written, entered into aioimaplib's table one after the other
        self.queued: list[Command] = []
        #: told after each batch of responses was parsed (for tests)
        self.after_parse: Callable[[], None] | None = None
        #: while an IDLE restart runs: told the first line of each tagged response and
        #: continuation, as parsed (:meth:`~trio_idle.imap.client.ImapConnection._restart_line`
        #: feeds it to the :class:`~trio_idle.imap.restart.RestartMachine`). Parsing is
        #: the reading task's, so the machine is fed by that task only: the session.
        self.on_answer: Callable[[bytes], None] | None = None
        self._lost_seen = False
        #: the last batch stopped at :data:`STEP_PARTS`: complete responses may wait
        self._backlog = False
        #: lines and literals handed to aioimaplib, over the connection's life (for tests)
        self.parsed_parts = 0

    # -- what the connection calls ------------------------------------------------------

    def learn_capabilities(self, words: list[str]) -> bool:
        """Keep the server's capabilities (a CAPABILITY answer's words) where aioimaplib's
        parser reads them; False when none of them is an IMAP version (not an IMAP
        server)."""
        self.capabilities = CAPABILITY_SETS.shared(words)
        versions = [w.upper() for w in words if w.upper() in IMAP_VERSIONS]
        if not versions:
            return False
        self.imap_version = _VERSION_NAMES[versions[-1]]  # the constant, not a copy
        return True

    def take_greeting(self) -> bytes | None:
        """The server's greeting line once it came (None before), for the handshake: it
        is not kept after (≈ 0.1 KiB per connection). Later lines are still not taken for
        a greeting."""
        greeting = self.greeting
        if greeting:
            self.greeting = b""
        return greeting

    def add_capabilities(self, words: Iterable[str]) -> None:
        """Capabilities the server announced later (e.g. in LOGIN's answer) join the
        ones known."""
        self.capabilities = CAPABILITY_SETS.shared(self.capabilities.union(words))

    def new_idle(self, tag: str | None = None) -> IdleCommand:
        """A new IDLE command (under ``tag``, else a new one); :attr:`idle_continued` is
        False until its ``+``."""
        self.idle_continued = False
        return IdleCommand(tag if tag is not None else self.new_tag())

    def allows(self, name: str) -> bool:
        """Whether command ``name`` is valid in the current :attr:`state`."""
        return self.state in _entry(name).valid_states

    def lost(self, exc: Exception | None) -> None:
        """The connection ended (server close, read error, or our own close): once.

        Also drops what referred back to this object (its bound callback, the commands
        still pending), so an ended connection is freed by reference counting, without
        waiting for a full garbage collection."""
        if not self._lost_seen:
            self._lost_seen = True
            self.monitor.connection_lost(exc or self._protocol_error)
            self.after_parse = None
            self.on_answer = None
            self.pending_sync_command = None
            self.pending_async_commands = _NO_COMMANDS
            self.queued.clear()

    def data_received(self, d: bytes) -> None:
        """Bytes read from the server: framed, and the first batch of the responses they
        complete parsed (:meth:`parse_some`); :attr:`backlog` says if more wait."""
        self.monitor.activity()
        if self.closing or self._protocol_error is not None:
            return
        self.framer.feed(d)
        self.parse_some()

    @property
    def backlog(self) -> bool:
        """Responses already read may wait unparsed: the reader must call
        :meth:`parse_some` (after a checkpoint) before it reads again."""
        return (
            self._backlog
            and not self.closing
            and not self.tls_pending
            and self._protocol_error is None
        )

    def parse_some(self) -> None:
        """Parse the framed responses, at most :data:`STEP_PARTS` lines and literals of
        them (the response crossing the bound is finished), then tell
        :attr:`after_parse`. Synchronous; a batch is what one read was before responses
        were batched: whatever it completes is seen by the next caller."""
        self._handle_buffered()
        if self.after_parse is not None:
            self.after_parse()

    def start_parsing_tls(self) -> None:
        """TLS is up after STARTTLS: parse again (what arrived since was decrypted)."""
        self.tls_pending = False
        self._handle_buffered()

    def advance_queue(self) -> None:
        """Enter the next queued command into the table if nothing is pending."""
        if self.queued and self.pending_sync_command is None and not self.pending_async_commands:
            self.register(self.queued.pop(0))

    def register(self, command: Command) -> None:
        """Enter ``command`` into aioimaplib's table of pending commands, as its
        ``execute`` does (without writing it)."""
        if _entry(command.name).exec == aioimaplib.Exec.is_sync:
            self.pending_sync_command = command
        else:
            commands = self.pending_async_commands
            if not isinstance(commands, dict):
                self.pending_async_commands = commands = {}
            commands[command.untagged_resp_name] = command

    def idle_done(self) -> None:
        self.idle_outstanding = False
        self.write(b"DONE\r\n")

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    # -- parsing ------------------------------------------------------------------------

    def _handle_buffered(self) -> None:
        try:
            if self.tls_pending:
                if self.framer.buffered > self.limits.max_line:  # held back: still bounded
                    raise FrameTooLarge("server sent data after accepting STARTTLS")
                return
            framer = self.framer
            budget = STEP_PARTS
            self._backlog = False
            while not self.tls_pending:
                if budget <= 0:
                    self._backlog = True
                    return
                response = framer.next_response()
                if response is None:
                    return
                parts = 1 + framer.last_literals
                self.parsed_parts += parts
                budget -= parts
                self._handle_response(response)
                if self._protocol_error is not None:
                    return
        except FrameError as exc:
            self._drop(exc, str(exc))
        except Exception as exc:  # escaping here, it would end the session's task
            self._drop(exc, f"protocol error: {type(exc).__name__}: {exc}"[:200])

    def _handle_response(self, response: bytes) -> None:
        sync = self.pending_sync_command
        collecting = self._collecting()
        # named now: the answer may end the command
        waiting = (
            ""
            if not collecting
            else sync.name
            if sync is not None
            else "/".join(self.pending_async_commands)
        )
        if self.capture is not None and response[:1] == b"*":
            self.capture.append(response)
        try:
            # aioimaplib's data_received minus its eager debug formatting of every read
            self._handle_responses(response, self._handle_line)
        except aioimaplib.IncompleteRead:
            # aioimaplib would wait for more of this response: it read a literal where the
            # framer read none (a bare LF before the CRLF), and would buffer without bound
            raise FrameError(
                "server sent a malformed response (a bare LF next to a literal)"
            ) from None
        if sync is not None and sync.name == "STARTTLS" and self.pending_sync_command is None:
            self.tls_pending = True
        if self.on_answer is not None and response[:1] != b"*":
            self.on_answer(response.partition(b"\r\n")[0])
        if collecting and not self.pending_async_commands:
            self.pending_async_commands = _NO_COMMANDS  # the last one was answered
        if collecting:
            self._answer_bytes += len(response)
            budget = self.limits.max_fetch_answer if waiting == "FETCH" else self.limits.max_answer
            if self._answer_bytes > budget:
                raise FrameTooLarge(
                    f"server sent more than {format_size(budget)} in answer to {waiting}"
                )
        self.advance_queue()
        if not self._collecting():
            self._answer_bytes = 0

    def _collecting(self) -> bool:
        """Whether aioimaplib keeps the untagged lines now (IDLE's it hands to a queue)."""
        sync = self.pending_sync_command
        return (sync is not None and sync.name != "IDLE") or bool(self.pending_async_commands)

    def _drop(self, exc: Exception, reason: str) -> None:
        self._protocol_error = exc
        self.monitor.mark_dead(reason)
        if self.transport is not None:
            self.transport.close()
        self.lost(exc)

    def _handle_line(self, line: bytes, current_cmd: Any) -> Any:
        if line and self.state == aioimaplib.CONNECTED:
            # aioimaplib would start a greeting task per line until the first one ran:
            # only the first line is the greeting, and the connection handles it
            if self.greeting is None:
                self.greeting = line
            return None
        return super()._handle_line(line, current_cmd)

    def _continuation(self, line: bytes) -> None:
        sync = self.pending_sync_command
        if sync is not None and sync.name == "IDLE":
            # aioimaplib's branch for IDLE sets its _idle_event (and logs): the flag is ours
            self.idle_continued = True
            return
        super()._continuation(line)

    def _untagged_response(self, line: bytes) -> Any:
        self.monitor.untagged(line)
        return super()._untagged_response(line)
