"""Summarise a ``py-spy record --format raw`` file (collapsed stacks).

``python -m bench.profile_summary FILE [--top 25]`` prints the frames with the
most samples on top of the stack (self) and anywhere in the stack (inclusive), and a
rough split by module family (trio, asyncio, trio_asyncio, aioimaplib, loguru, httpx...).
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterable

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

FAMILIES = (
    ("trio_asyncio", "trio_asyncio"),
    ("aioimaplib", "aioimaplib"),
    ("asyncio", "asyncio/"),
    ("loguru", "loguru"),
    ("httpx/httpcore/h11", "http"),
    ("trio_idle", "trio_idle"),
    ("trio", "trio/"),
    ("ssl", "ssl.py"),
)


def parse(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """``(frames root→leaf, samples)`` per line of the raw file."""
    out = []
    for line in lines:
        line = line.rstrip("\n")
        if not line or " " not in line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            samples = int(count)
        except ValueError:
            continue
        out.append((stack.split(";"), samples))
    return out


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


def family(frame: str) -> str:
    """Which library a frame belongs to (first match in :data:`FAMILIES`)."""
    for name, marker in FAMILIES:
        if marker in frame:
            return name
    return "other"


def summarise(stacks: list[tuple[list[str], int]], top: int) -> str:
    """Text report: total, self-time top list, inclusive top list, families."""
    total = sum(n for _, n in stacks)
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    fam: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        if not frames:
            continue
        leaf = _short(frames[-1])
        own[leaf] += n
        fam[family(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            incl[f] += n
    lines = [f"samples: {total}"]
    lines.append("\nself (top of stack):")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("\ninclusive (anywhere in stack):")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in incl.most_common(top)]
    lines.append("\nself time by library:")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in fam.most_common()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.profile_summary")
    p.add_argument("file")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    with open(args.file, encoding="utf-8") as f:
        print(summarise(parse(f), args.top))


if __name__ == "__main__":
    main()
