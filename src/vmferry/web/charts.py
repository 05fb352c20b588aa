"""Inline SVG charts of a migration: its phases on a timeline and the bytes of each pass.

Pure functions from a job record (and its trace, where the agent has one) to SVG markup;
no JavaScript, no chart library. Text is escaped; sizes fit a 1366-pixel-wide screen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from html import escape
from typing import Any

WIDTH = 640
LABEL_W = 96
VALUE_W = 90
ROW_H = 22
BAR_H = 14

#: Phase colours (the rollback is red, every copy phase blue-ish).
PHASE_COLOURS = {
    "queued": "#9aa5b1",
    "checks": "#7b8794",
    "setup": "#52606d",
    "mirror": "#2680c2",
    "precopy": "#1f6fb2",
    "postcopy": "#8e44ad",
    "switchover": "#e67e22",
    "resume": "#27ae60",
    "announce": "#16a085",
    "cleanup": "#95a5a6",
    "rollback": "#c0392b",
}


@dataclass(frozen=True)
class Bar:
    """One bar of a chart: its label, start offset, length and the text beside it."""

    label: str
    start: float
    length: float
    text: str
    colour: str = "#1f6fb2"


def _svg(bars: list[Bar], scale_max: float, title: str, axis: str) -> str:
    plot_w = WIDTH - LABEL_W - VALUE_W
    height = ROW_H * len(bars) + 28
    k = plot_w / scale_max if scale_max > 0 else 0.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}">',
        f"<title>{escape(title)}</title>",
    ]
    for i, b in enumerate(bars):
        y = 4 + i * ROW_H
        x = LABEL_W + b.start * k
        w = max(1.5, b.length * k)
        parts.append(
            f'<text x="{LABEL_W - 6}" y="{y + BAR_H - 2}" text-anchor="end">'
            f"{escape(b.label)}</text>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{BAR_H}" fill="{b.colour}">'
            f"<title>{escape(b.label)}: {escape(b.text)}</title></rect>"
            f'<text x="{min(x + w + 4, WIDTH - VALUE_W + 4):.1f}" y="{y + BAR_H - 2}">'
            f"{escape(b.text)}</text>"
        )
    base = 4 + len(bars) * ROW_H
    parts.append(
        f'<line x1="{LABEL_W}" y1="{base}" x2="{LABEL_W + plot_w}" y2="{base}" stroke="#7b8794"/>'
        f'<text x="{LABEL_W}" y="{base + 16}">0</text>'
        f'<text x="{LABEL_W + plot_w}" y="{base + 16}" text-anchor="end">{escape(axis)}</text>'
        "</svg>"
    )
    return "".join(parts)


def phase_bars(job: dict[str, Any], now: float | None = None) -> list[Bar]:
    """The job's phases as bars on one time axis starting at the first phase."""
    phases = [p for p in job.get("phases") or [] if p.get("started_at") is not None]
    if not phases:
        return []
    t0 = float(phases[0]["started_at"])
    now = time.time() if now is None else now
    bars = []
    for p in phases:
        start = float(p["started_at"]) - t0
        end = float(p["ended_at"]) if p.get("ended_at") is not None else now
        dur = max(0.0, end - float(p["started_at"]))
        text = f"{dur:.3f} s" + ("" if p.get("ended_at") is not None else " …")
        colour = PHASE_COLOURS.get(str(p["phase"]), "#7b8794")
        bars.append(Bar(str(p["phase"]), start, dur, text, colour))
    return bars


def phases_svg(job: dict[str, Any], now: float | None = None) -> str:
    """A timeline of the job's phases (one row per phase), or "" if it has none."""
    bars = phase_bars(job, now)
    if not bars:
        return ""
    span = max(b.start + b.length for b in bars)
    return _svg(bars, span, "phases of the move", f"{span:.2f} s")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def pass_rows(trace: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The trace's pass table (``GET /v1/migrations/{id}/trace``: ``passes``), or []."""
    rows = (trace or {}).get("passes")
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, dict) and r.get("pass") is not None]


def pass_bytes(job: dict[str, Any], trace: dict[str, Any] | None) -> tuple[list[Bar], str]:
    """Bytes sent per memory pass, and where the figures came from.

    From the agent's trace when it has a pass table; otherwise from the job record: the
    first pass and everything after it.
    """
    rows = pass_rows(trace)
    if rows:
        bars = []
        for r in rows:
            sent = float(r.get("bytes") or 0)
            bars.append(Bar(f"pass {r['pass']}", 0.0, sent, _mib(sent)))
        return bars, "trace"
    ram = (job.get("qemu_stats") or {}).get("ram") or {}
    total = float(ram.get("transferred") or job.get("bytes_sent") or 0)
    first = job.get("first_pass_bytes")
    passes = int((job.get("progress") or {}).get("passes") or 0)
    if not total:
        return [], "none"
    if first is None or passes < 2:
        return [Bar("all passes", 0.0, total, _mib(total))], "job"
    rest = max(0.0, total - float(first))
    return [
        Bar("pass 1", 0.0, float(first), _mib(float(first))),
        Bar(f"passes 2-{passes}", 0.0, rest, _mib(rest)),
    ], "job"


def passes_svg(job: dict[str, Any], trace: dict[str, Any] | None) -> tuple[str, str]:
    """A bar chart of the bytes per pass, and the source of its figures (trace/job/none)."""
    bars, source = pass_bytes(job, trace)
    if not bars:
        return "", source
    top = max(b.length for b in bars)
    return _svg(bars, top, "bytes sent per pass", _mib(top)), source
