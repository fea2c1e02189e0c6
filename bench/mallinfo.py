"""glibc's heap figures (``mallinfo2``): what malloc handed out and still holds, OpenSSL's
allocations included — :mod:`tracemalloc` sees only Python's. Imports nothing of
``trio_idle`` (the memory child loads it from another tree after this)."""

from __future__ import annotations

import ctypes
import ctypes.util


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_info() -> dict[str, int] | None:
    """Bytes ``in_use`` (small blocks and mmapped ones), ``free`` inside the heap, and
    ``mmapped``; None where there is no glibc ``mallinfo2`` (glibc < 2.33, not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        fn = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return {
        "in_use": int(info.uordblks + info.hblkhd),
        "free": int(info.fordblks),
        "mmapped": int(info.hblkhd),
    }
