"""The human table on stdout and the RSS / latency plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.soak_analysis import format_diff

COLUMNS = (
    ("N", 6),
    ("sec", 5),
    ("log", 7),
    ("ramp20/50", 10),
    ("ramp hi", 8),
    ("KiB/sess", 11),
    ("CPU%tick", 9),
    ("CPU%none", 9),
    ("ms/tick", 8),
    ("p50ms", 7),
    ("p99ms", 7),
    ("maxms", 7),
    ("missed", 7),
    ("recon s", 11),
    ("stop s", 11),
)


def _get(run: dict[str, Any], *path: str) -> Any:
    value: Any = run
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _pair(a: Any, b: Any, digits: int = 1) -> str:
    return f"{_num(a, digits)}/{_num(b, digits)}"


def tick_cpu_ms(run: dict[str, Any]) -> float | None:
    """CPU per tick (ms): B's idle CPU minus A's (no ticks), over B's window, per NOOP."""
    a = _get(run, "default_limiter", "idle_cpu_no_tick")
    b = _get(run, "high_limiter", "idle_cpu")
    if not a or not b or not b.get("noops"):
        return None
    extra = b["cpu_s"] - a["cpu_s"] / a["window_s"] * b["window_s"]
    return float(extra / b["noops"] * 1000)


def row_cells(run: dict[str, Any]) -> list[str]:
    """One table row: A = default limiter daemon, B = opened-up limiter daemon."""
    a, b = run.get("default_limiter", {}), run.get("high_limiter", {})
    return [
        str(run["n"]),
        "tls" if run["tls"] else "plain",
        run["log_level"],
        _num(_get(a, "ramp", "sessions_per_s"), 0),
        _num(_get(b, "ramp", "sessions_per_s"), 0),
        _pair(_get(a, "memory", "per_session_kib"), _get(b, "memory", "per_session_kib")),
        _num(_get(b, "idle_cpu", "pct_of_one_core"), 2),
        _num(_get(a, "idle_cpu_no_tick", "pct_of_one_core"), 2),
        _num(tick_cpu_ms(run), 2),
        _num(_get(b, "latency", "p50_ms"), 1),
        _num(_get(b, "latency", "p99_ms"), 1),
        _num(_get(b, "latency", "max_ms"), 1),
        _num(_get(b, "latency", "missed")),
        _pair(_get(a, "reconcile", "seconds"), _get(b, "reconcile", "seconds"), 2),
        _pair(_get(a, "shutdown", "seconds"), _get(b, "shutdown", "seconds"), 2),
    ]


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table; pairs are ``A/B`` (default limiter / opened-up limiter)."""
    lines = [" ".join(name.rjust(width) for name, width in COLUMNS)]
    for run in runs:
        cells = row_cells(run)
        lines.append(" ".join(c.rjust(width) for c, (_, width) in zip(cells, COLUMNS, strict=True)))
    lines.append(
        "ramp = sessions/s until all in IDLE; KiB/sess, recon s, stop s = A/B daemon "
        "(A: limiter 20/50/s, no tick; B: opened up, ticks); CPU% = of one core"
    )
    for run in runs:
        c = run.get("soak")
        if c:
            s = c["soak"]
            lines.append(
                f"soak N={run['n']}: {s['seconds']:.0f}s, RSS {s['rss_first_kib'] / 1024:.0f}"
                f"→{s['rss_last_kib'] / 1024:.0f} MiB (max {s['rss_max_kib'] / 1024:.0f}), "
                f"CPU {s['cpu_pct_of_one_core']:.2f}%, reconnects {s['reconnects']}, "
                f"pushes {s['pushes']['appends']} missed {s['pushes']['missed']} "
                f"p99 {s['pushes']['p99_ms']} ms max {s['pushes']['max_ms']} ms"
            )
            growth, stalls = s.get("growth") or {}, s.get("stalls") or {}
            if growth:
                pct = growth.get("pct_per_hour")
                lines.append(
                    f"  RSS growth after the first {growth['warmup_s']:.0f}s: "
                    + (
                        f"{pct:+.2f} %/h ({growth['kib_per_hour']:+.0f} KiB/h, "
                        f"{growth['samples']} samples)"
                        if pct is not None
                        else f"– (only {growth['samples']} samples after the warm-up)"
                    )
                    + f"; longest loop stall {_stall_text(stalls)} ms"
                    + (" (tracemalloc snapshots included)" if s.get("tracemalloc") else "")
                )
            traced = s.get("tracemalloc")
            if traced:
                lines.append(
                    f"  tracemalloc: {len(traced['snapshots'])} snapshots in "
                    f"{traced['directory']}; grew most between the first and the last "
                    f"({traced.get('between_s', '?')} s apart):"
                )
                lines.extend(format_diff(traced["top"][:10]))
            gc = s.get("gc")
            if gc:
                collections = gc.get("refresh_t_kind_ms_collected", [])
                pauses = ", ".join(f"{kind} {ms:.1f}" for _, kind, ms, _ in collections)
                forced = gc["forced_full"]
                lines.append(
                    f"  collections after refreshes (ms): {pauses or 'none'}; a forced full "
                    f"one at the end: {forced.get('ms', '?')} ms, freed "
                    f"{forced.get('collected', '?')} objects, RSS "
                    f"{gc['rss_before_forced_kib'] / 1024:.0f}→"
                    f"{gc['rss_after_forced_kib'] / 1024:.0f} MiB"
                )
    return "\n".join(lines)


def _stall_text(stalls: dict[str, Any]) -> str:
    if stalls.get("max_ms") is not None:
        return f"{stalls['max_ms']:.1f}"
    return f"< {stalls.get('below_ms', '?')}"


MARKDOWN_HEADER = (
    "| N | | ramp 20/50 (s/s) | ramp 200/2000 (s/s) | KiB/session A/B | idle CPU %, ticks "
    "| idle CPU %, no ticks | CPU ms/tick | p50 ms | p99 ms | max ms | missed "
    "| reconcile 10 % A/B (s) | shutdown A/B (s) | LOGOUTs A/B |\n"
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown_table(runs: Sequence[dict[str, Any]]) -> str:
    """The results table of docs/performance.md (full runs only)."""
    lines = [MARKDOWN_HEADER]
    for run in runs:
        if run["quick"]:
            continue
        a, b = run.get("default_limiter", {}), run.get("high_limiter", {})
        cells = row_cells(run)
        del cells[2]  # the log level: the table is the WARNING runs
        cells.append(_pair(_get(a, "shutdown", "logouts"), _get(b, "shutdown", "logouts")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_plot(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """RSS per session and p99 push→webhook latency against N (full runs, WARNING log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for tls, style in ((False, "o-"), (True, "s--")):
        chosen = sorted(
            (r for r in runs if r["tls"] == tls and not r["quick"] and r["log_level"] == "WARNING"),
            key=lambda r: r["n"],
        )
        if not chosen:
            continue
        label = "TLS" if tls else "plaintext"
        ns = [r["n"] for r in chosen]
        rss = [
            _get(r, "default_limiter", "memory", "per_session_kib")
            or _get(r, "high_limiter", "memory", "per_session_kib")
            for r in chosen
        ]
        p99 = [_get(r, "high_limiter", "latency", "p99_ms") for r in chosen]
        left.plot(ns, rss, style, label=label)
        right.plot(ns, p99, style, label=label)
    left.axhline(40, color="grey", linestyle=":", linewidth=1, label="target plain (40)")
    left.axhline(80, color="grey", linestyle="-.", linewidth=1, label="target TLS (80)")
    right.axhline(20, color="grey", linestyle=":", linewidth=1, label="target (20 ms)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("sessions (N)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("daemon RSS per session (KiB)")
    left.set_title("Memory per IMAP IDLE session")
    right.set_ylabel("EXISTS sent → POST received, p99 (ms)")
    right.set_title("Push → webhook latency (p99)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: the comparison plot's panels: (title, y label, path into a stack's record)
COMPARE_PANELS = (
    ("Memory per session", "RSS after the ramp − before, / N (KiB)", ("memory", "per_session_kib")),
    ("Idle CPU with ticks", "% of one core", ("idle_cpu", "pct_of_one_core")),
    ("Push → webhook p99", "EXISTS sent → POST received (ms)", ("latency", "p99_ms")),
    (
        "Longest loop stall during the pushes (a refresh included)",
        "20 ms timer late by (ms)",
        ("stalls", "latency", "max_ms"),
    ),
)


def compare_series(
    runs: Sequence[dict[str, Any]], stack: str, tls: bool, path: Sequence[str]
) -> tuple[list[int], list[float]]:
    """``(N values, figures)`` of one program and mode from ``--compare`` records (full runs
    only, one point per N: the last record wins; missing figures are left out)."""
    by_n: dict[int, float] = {}
    for run in runs:
        if run["tls"] != tls or run.get("quick"):
            continue
        value = _get(run, stack, *path)
        if isinstance(value, int | float):
            by_n[run["n"]] = float(value)
    ns = sorted(by_n)
    return ns, [by_n[n] for n in ns]


def make_compare_plot(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Both programs side by side against N: memory per session, idle CPU, p99, stall
    (Node orange, trio-idle blue; plaintext circles and solid, TLS squares and dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    programs = (("node", "Node + imapflow", "tab:orange"), ("trio_idle", "trio-idle", "tab:blue"))
    for ax, (title, ylabel, field) in zip(axes.flat, COMPARE_PANELS, strict=True):
        for stack, name, colour in programs:
            for tls, style in ((False, "o-"), (True, "s--")):
                ns, values = compare_series(runs, stack, tls, field)
                if ns:
                    label = f"{name}, {'TLS' if tls else 'plaintext'}"
                    ax.plot(ns, values, style, color=colour, label=label)
        if field[0] in ("latency", "stalls"):
            ax.set_yscale("log")  # a few ms to seconds
        if field[0] == "stalls":
            ax.axhline(50, color="grey", linestyle=":", linewidth=1, label="target (50 ms)")
        ax.set_xscale("log")
        ax.set_xlabel("sessions (N)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(
        "trio-idle and the Node + imapflow baseline, one run per pair (python -m bench --compare)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
