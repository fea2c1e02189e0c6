"""Run-time switchable fault injection for :class:`~trio_idle_testing.ImapTestServer`.

A :class:`Faults` object exists globally (``server.global_faults``), per user
(``server.faults(user)``) and per connection (``session.faults``). For one connection the
effective value of a flag is the OR of the three objects that apply to it, and the effective
delay is the largest of the three.

Guarantee: assigning any field takes effect at once — the connections concerned are woken
(a connection parked by ``silent`` resumes when no applicable object says ``silent`` any more).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs


def _changed(instance: Faults, attribute: attrs.Attribute[Any], value: Any) -> Any:
    callback = instance._on_change
    if callback is not None and not attribute.name.startswith("_"):
        callback()
    return value


@attrs.define(eq=False, on_setattr=[attrs.setters.convert, attrs.setters.validate, _changed])
class Faults:
    """Fault switches; all default to "behave normally".

    * ``refuse_login`` — LOGIN / AUTHENTICATE answer
      ``NO [AUTHENTICATIONFAILED] Authentication failed.`` even with the right password.
    * ``login_reply`` — the text after ``NO`` of a refused LOGIN / AUTHENTICATE instead
      of that one (a provider's own words); the first non-empty of the connection's, the
      user's and the global object applies.
    * ``greeting_delay`` — seconds to wait before the greeting (only the global object and a
      connection's own object apply: the user is unknown before login).
    * ``response_delay`` — seconds to wait before answering each command (including ``DONE``).
    * ``no_push`` — while in IDLE never push ``EXISTS``/``EXPUNGE`` (nor on ``DONE``);
      NOOP, CHECK and other commands still report changes. Keepalives continue.
    * ``silent`` — half-open peer: the connection stops reading and writing but the socket
      stays open (no FIN, no RST). Global ``silent`` also makes new connections accept but
      never greet. Per user, a new connection is greeted but goes silent right after its
      LOGIN is processed (the tagged reply is never sent). Clearing it resumes the
      connections where they stopped (bytes the client sent meanwhile are then processed).
    * ``no_select_uidnext`` — SELECT / EXAMINE answer without ``* OK [UIDNEXT n]``, as
      Courier-IMAP 5 does (RFC 3501 requires it); STATUS still answers UIDNEXT.
    * ``no_status_uidnext`` — STATUS leaves the UIDNEXT item out of its answer even when
      asked for it (the other items are answered).
    """

    refuse_login: bool = attrs.field(default=False, converter=bool)
    login_reply: str = attrs.field(default="", converter=str)
    greeting_delay: float = attrs.field(default=0.0, converter=float)
    response_delay: float = attrs.field(default=0.0, converter=float)
    no_push: bool = attrs.field(default=False, converter=bool)
    silent: bool = attrs.field(default=False, converter=bool)
    no_select_uidnext: bool = attrs.field(default=False, converter=bool)
    no_status_uidnext: bool = attrs.field(default=False, converter=bool)
    _on_change: Callable[[], None] | None = attrs.field(
        default=None, init=False, repr=False, alias="_on_change"
    )

    def reset(self) -> None:
        """Switch every fault off."""
        self.refuse_login = False
        self.login_reply = ""
        self.greeting_delay = 0.0
        self.response_delay = 0.0
        self.no_push = False
        self.silent = False
        self.no_select_uidnext = False
        self.no_status_uidnext = False

    def bind(self, callback: Callable[[], None] | None) -> None:
        """Set the function called after any public field is assigned (server internal)."""
        self._on_change = callback
