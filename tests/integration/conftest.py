"""The integration suite checks every in-process daemon's fault counters like the
reliability suite does (see ``tests/reliability/conftest.py``)."""

from tests.reliability.conftest import no_stray_errors

__all__ = ["no_stray_errors"]
