"""A wrapper that keeps secrets out of logs, errors and reprs."""

from __future__ import annotations

import attrs

from trio_idle.core.scrub import MASK


@attrs.frozen(repr=False, eq=True)
class Secret:
    """Holds a secret string; ``repr``/``str`` never show it. Call :meth:`reveal` at the edge."""

    _value: str

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)
