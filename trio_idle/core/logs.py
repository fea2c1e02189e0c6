"""Logging: loguru with the daemon's fixed line formats.

Every line of a session starts with ``[idle/<email>]``, the reconciler's with
``[idle/db]``. The message text is the contract (operators grep for it). Two formats:

* ``text``: ``<local time with UTC offset> <LEVEL> <message>``, one line each;
* ``json``: one flat object per line, the schema of :func:`json_line` (documented in
  docs/operations.md, "Log lines"): RFC 3339 UTC time, level, event name, the message,
  and the fields a line has (connection id, host, scan id, duration, error kind, the
  email address only when :func:`setup_logging` is allowed to show it).

Under systemd, when stdout/stderr is the journal (``JOURNAL_STREAM``), each line starts
with its syslog priority ``<N>`` (sd-daemon(3)), so ``journalctl -p err`` finds errors.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, TextIO

from loguru import logger

if TYPE_CHECKING:
    import loguru

from trio_idle.core.scrub import Scrubber, Scrubs, escape_controls

#: our own lines are not cut like server text, but no line may grow without bound
MAX_LINE_CHARS: Final = 8192

_net = Scrubber(limit=MAX_LINE_CHARS)
#: False: a session's lines name its connection id instead of its email address
_show_email = True


def _patch(record: Any) -> None:
    message = record["message"]
    extra = record["extra"]
    if not _show_email and (email := extra.get("mailbox")):
        hidden = f"#{extra.get('connection_id', '')}"
        message = message.replace(escape_controls(email), hidden).replace(email, hidden)
    record["message"] = _net.scrub(message)


def protect_secrets(secrets: Iterable[str | None]) -> None:
    """Mask these process-wide secrets in every log line from now on, and make every
    line one printable line (control characters escaped).

    The last line of defence: text from outside is scrubbed where it enters
    (:mod:`trio_idle.core.scrub`); this net also catches the admin secret, the key and the
    database password wherever a library might quote them. Each call replaces the
    previous set (one process, one configuration).
    """
    global _net
    _net = Scrubber(secrets, limit=MAX_LINE_CHARS)
    logger.configure(patcher=_patch)


#: lines at this level and above are the error stream's (console.error); the rest stdout's
ERROR_STREAM_LEVEL: Final = "WARNING"

#: loguru level → syslog priority (sd-daemon(3): ``<N>`` at the start of a line)
JOURNAL_PRIORITIES: Final[Mapping[str, int]] = {
    "TRACE": 7,
    "DEBUG": 7,
    "INFO": 6,
    "SUCCESS": 5,  # notice
    "WARNING": 4,
    "ERROR": 3,
    "CRITICAL": 2,
}


def journal_priority(level: str, level_no: int) -> int:
    """The syslog priority of a loguru level (a custom level: by its number)."""
    if level in JOURNAL_PRIORITIES:
        return JOURNAL_PRIORITIES[level]
    for name, number in (("CRITICAL", 50), ("ERROR", 40), ("WARNING", 30), ("SUCCESS", 25)):
        if level_no >= number:
            return JOURNAL_PRIORITIES[name]
    return 6 if level_no >= 20 else 7


def is_journal_stream(journal_stream: str | None, st_dev: int, st_ino: int) -> bool:
    """Whether ``JOURNAL_STREAM`` (``"<device>:<inode>"``, decimal, set by systemd when
    stdout or stderr is connected to the journal) names the file with this device and
    inode. systemd.exec(5): compare it with fstat() of the descriptor, since a child may
    inherit the variable while its own output goes elsewhere (a pipe, a file)."""
    if not journal_stream:
        return False
    dev, sep, ino = journal_stream.strip().partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    return int(dev) == st_dev and int(ino) == st_ino


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream``'s descriptor is the journal stream ``JOURNAL_STREAM`` names."""
    journal_stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM")
    if not journal_stream:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no descriptor (a StringIO, closed)
        return False
    return is_journal_stream(journal_stream, st.st_dev, st.st_ino)


def traceback_frames(exc: BaseException) -> str:
    """``file:line function > ...``: the last 8 frames of ``exc``'s traceback, one line."""
    return " > ".join(
        f"{frame.filename.rpartition('/')[2]}:{frame.lineno} {frame.name}"
        for frame in traceback.extract_tb(exc.__traceback__)[-8:]
    )


def _exception_text(record: Mapping[str, Any]) -> str | None:
    """One scrubbed line for an exception attached with ``logger.opt(exception=...)``
    (loguru's own rendering would print its text raw, over several lines)."""
    attached = record["exception"]
    if attached is None or attached.value is None:
        return None
    exc = attached.value
    frames = traceback_frames(exc)
    return _net.scrub(
        f"{type(exc).__name__}: {exc}" + (f" (at {frames})" if frames else ""), MAX_LINE_CHARS
    )


def text_line(record: Mapping[str, Any]) -> str:
    """``2025-03-01 14:02:03.123+01:00 INFO    <message>``: local time with its offset."""
    time: datetime.datetime = record["time"]
    stamp = time.isoformat(sep=" ", timespec="milliseconds")
    line = f"{stamp} {record['level'].name: <7} {record['message']}"
    if (exc := _exception_text(record)) is not None:
        line += f" | {exc}"
    return line


#: (what the message says after its ``[idle/...]`` prefix, event name), first match wins;
#: the lines docs/operations.md lists. Any other line's event is its component.
EVENTS: Final[tuple[tuple[str, str], ...]] = (
    ("connected (", "connected"),
    ("exists-event received", "exists_event"),
    ("tick:", "tick_found_mail"),
    ("catch-up scan", "catch_up_scan"),
    ("scan-triggered", "scan_triggered"),
    ("scan failed:", "scan_failed"),
    ("scan rejected:", "scan_rejected"),
    ("idle renewing", "idle_renewing"),
    ("reconnecting in", "reconnecting"),
    ("connect failed:", "connect_failed"),
    ("connection lost:", "connection_lost"),
    ("authentication failed:", "auth_failed"),
    ("no access token", "token_unavailable"),
    ("server has no IDLE capability", "no_idle"),
    ("internal error", "internal_error"),
    ("connection task crashed", "internal_error"),
    ("refreshed —", "refreshed"),
    ("refresh failed:", "refresh_failed"),
    ("SIGHUP:", "sighup"),
    ("cannot start:", "cannot_start"),
    ("shutting down", "shutting_down"),
    ("stopped", "stopped"),
    ("trio-idle ", "starting"),
)
_PREFIX = re.compile(r"^\[idle/([^\]]*)\] ?")


def event_of(message: str, *, session: bool = False) -> tuple[str, str]:
    """``(component, event)`` of a message: the component is the word of its
    ``[idle/<x>]`` prefix (``session`` for a mailbox's lines, ``process`` without a
    prefix); the event from :data:`EVENTS`, else the component itself."""
    match = _PREFIX.match(message)
    if match is None:
        return "process", "process"
    name = match.group(1)
    component = "session" if session or "@" in name else name
    rest = message[match.end() :]
    for start, event in EVENTS:
        if rest.startswith(start):
            return component, event
    return component, component


#: the fields a line may carry beyond time, level, event and message (bound with
#: ``logger.bind``), in the order they are written; ``email`` only when allowed
JSON_FIELDS: Final = ("connection_id", "host", "scan_id", "duration", "error_kind")


def json_line(record: Mapping[str, Any], *, show_email: bool = True) -> str:
    """One flat JSON object (see docs/operations.md, "Log lines"): ``time`` (RFC 3339,
    UTC), ``level``, ``event``, ``component``, ``message``, then whichever of
    :data:`JSON_FIELDS` the line has, ``email`` (only with ``show_email``) and
    ``exception``. Keys without a value are left out."""
    time: datetime.datetime = record["time"]
    extra = record["extra"]
    component, event = event_of(record["message"], session="mailbox" in extra)
    out: dict[str, Any] = {
        "time": time.astimezone(datetime.UTC).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "event": extra.get("event") or event,
        "component": component,
        "message": record["message"],
    }
    for name in JSON_FIELDS:
        if (value := extra.get(name)) is not None:
            out[name] = value
    if show_email and (email := extra.get("mailbox")):
        out["email"] = email
    if (exc := _exception_text(record)) is not None:
        out["exception"] = exc
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"), default=str)


class _Sink:
    """Writes each record as one line (``<N>``-prefixed for the journal) and flushes."""

    def __init__(self, stream: TextIO, fmt: str, *, journal: bool) -> None:
        self._stream = stream
        self._json = fmt == "json"
        self._journal = journal

    def __call__(self, message: Any) -> None:
        record = message.record
        line = json_line(record, show_email=_show_email) if self._json else text_line(record)
        if self._journal:
            line = f"<{journal_priority(record['level'].name, record['level'].no)}>{line}"
        self._stream.write(line + "\n")
        self._stream.flush()


def setup_logging(
    level: str = "INFO",
    fmt: str = "text",
    stream: TextIO | None = None,
    *,
    split: bool = True,
    show_email: bool = True,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Replace loguru's sinks with ours. Safe to call more than once.

    Where lines go, as the Node daemon's ``console.log`` / ``console.error`` did (PM2's
    ``out_file`` / ``error_file``, see docs/operations.md): with ``split`` (the daemon),
    lines below WARNING on stdout and WARNING and above on stderr, each line on exactly
    one of them, in either format. ``split=False``: every line on stderr (commands whose
    stdout is their report). ``stream``: every line on that one stream (tests).
    Both streams are flushed after each line, so neither lags behind the other.

    A stream that is the journal (``JOURNAL_STREAM`` in ``environ``, default
    ``os.environ``, names its descriptor) gets the ``<N>`` priority prefix.
    ``show_email=False``: a session's address is replaced by ``#<connection id>`` in its
    lines, and JSON lines have no ``email`` field.
    """
    global _show_email
    _show_email = show_email
    logger.configure(patcher=_patch)
    logger.remove()

    def add(target: TextIO, **options: Any) -> None:
        journal = writes_to_journal(target, environ)
        sink = _Sink(target, fmt, journal=journal)
        logger.add(sink, format="{message}", backtrace=False, diagnose=False, **options)

    if stream is not None or not split:
        add(stream or sys.stderr, level=level)
    else:
        threshold = logger.level(ERROR_STREAM_LEVEL).no
        add(sys.stdout, level=level, filter=lambda record: record["level"].no < threshold)
        add(sys.stderr, level=max(logger.level(level).no, threshold))
    # aioimaplib logs through the stdlib at DEBUG (including raw protocol lines): keep
    # it quiet unless asked, and never below WARNING for asyncio's noise.
    logging.getLogger("aioimaplib").setLevel(logging.WARNING)


class Logger(Protocol):
    """What the daemon's code asks of a logger it is handed: loguru's ``logger`` and what
    its ``bind`` returns satisfy it, and so do the tests' recording fakes.

    A line is one message string (already scrubbed and prefixed by the caller); the
    structured fields of the JSON format are attached with :meth:`bind`."""

    def bind(self, **fields: Any) -> Logger:
        """The same logger with ``fields`` added to every record it writes."""
        ...

    def info(self, message: str, /) -> None: ...

    def warning(self, message: str, /) -> None: ...

    def error(self, message: str, /) -> None: ...


def prefix(email: str) -> str:
    """The ``[idle/<email>]`` prefix of a session's lines (the email made printable)."""
    return f"[idle/{escape_controls(email)}]"


def log_internal_error(log: Logger, where: str, exc: BaseException, scrub: Scrubs) -> None:
    """One ERROR line for a bug: the scrubbed message plus the traceback's frames.

    The exception's own text goes through ``scrub`` (it may quote a server's answer or a
    command line); loguru's exception rendering would print it raw.
    """
    frames = traceback_frames(exc)
    log.bind(error_kind="internal").error(
        f"{where} internal error: {type(exc).__name__}: {scrub.scrub(str(exc))}"
        + (f" (at {frames})" if frames else "")
    )


class _SessionLogger:
    """A session's logger: loguru's, with the connection's fields bound when a line is
    written instead of held. A bound loguru logger keeps its own options tuple and
    fields dict (~370 bytes) for the whole life of the session; this keeps three
    references. Each line gets exactly the fields (and the caller's module, function
    and line) ``logger.bind(mailbox=…, connection_id=…, host=…)`` gave it."""

    __slots__ = ("_connection_id", "_email", "_host")

    def __init__(self, email: str, connection_id: str, host: str | None) -> None:
        self._email = email
        self._connection_id = connection_id
        self._host = host

    def bind(self, **fields: Any) -> Logger:
        bound: Logger = logger.bind(
            **{
                "mailbox": self._email,
                "connection_id": self._connection_id,
                "host": self._host,
                **fields,
            }
        )
        return bound

    def info(self, message: str, /) -> None:
        self._line().info(message)

    def warning(self, message: str, /) -> None:
        self._line().warning(message)

    def error(self, message: str, /) -> None:
        self._line().error(message)

    def _line(self) -> loguru.Logger:
        # depth=1: the record names our caller, as a bound logger's would
        return logger.bind(
            mailbox=self._email, connection_id=self._connection_id, host=self._host
        ).opt(depth=1)


def session_logger(email: str, connection_id: str, host: str | None = None) -> Logger:
    """A logger whose JSON records carry the connection (id, IMAP host, email); text
    lines carry the ``[idle/<email>]`` prefix the caller writes. It holds only the three
    values; they are bound to each line as it is written."""
    return _SessionLogger(email, connection_id, host)


def human_duration(seconds: float) -> str:
    """``5`` → ``5s``, ``1500`` → ``25min``, ``90`` → ``90s``, ``0.5`` → ``0.5s``."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}min"
    if seconds >= 600:
        return f"{seconds / 60:.0f}min"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.1f}s"
