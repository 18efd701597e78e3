"""Benchmark results in one shape: rows of per-round samples, the table, the JSON, the chart.

A :class:`Row` is one figure of one workload (a rate, a time, CPU per request) for several
daemons, one sample per round; the value shown is the median of the rounds. Every row names
its reference daemon (virtiofsd 1.14, or libfuse's passthrough_ll on /dev/fuse) and compares
every other daemon with it:

- ``ratio`` = value / reference value;
- ``relative`` = how the daemon does against the reference, above 1 when it does better: the
  ratio where higher is better (a rate), its inverse where lower is better (a time, CPU);
- ``target``, where issue 10 sets one, is the least ``relative`` it asks for: 0.9 for
  throughput and times ("≥ 0.9x virtiofsd"), 1/1.3 for CPU per request ("≤ 1.3x").

The JSON schema (``"schema": "pyvirtiofsd-bench/1"``) is described in docs/benchmarks.md; the
chart is hand-written SVG (no plotting library needed).
"""

from __future__ import annotations

import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "pyvirtiofsd-bench/1"

#: Daemon names as they appear in rows and in the JSON.
PY = "pyvirtiofsd"
#: The same daemon, its request path compiled with mypyc (bench/compiled.py).
PYC = "pyvirtiofsd compiled"
VIRTIOFSD = "virtiofsd"
LABELS = {
    PY: "pyvirtiofsd",
    PYC: "pyvirtiofsd (mypyc)",
    VIRTIOFSD: "virtiofsd 1.14",
}

#: Issue 10's bounds, as the least `relative` allowed.
THROUGHPUT_TARGET = 0.9
CPU_TARGET = 1 / 1.3


@dataclass
class Row:
    part: str  # which benchmark: frontend, guest, tree, queues, fusedev
    key: str  # unique within the part
    label: str
    unit: str
    better: str  # "higher" or "lower"
    reference: str  # the daemon the others are compared with
    target: float | None = None  # least `relative` issue 10 asks for
    samples: dict[str, list[float]] = field(default_factory=dict)  # daemon -> one per round
    # daemon -> name -> one sample per round (CPU seconds, requests: context for the value)
    extra: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # Daemons shown for context (the plain directory, a ceiling) but not compared.
    context: tuple[str, ...] = ()

    def add(self, daemon: str, value: float, **extra: float | None) -> None:
        self.samples.setdefault(daemon, []).append(value)
        for name, v in extra.items():
            if v is not None:
                self.extra.setdefault(daemon, {}).setdefault(name, []).append(v)

    @property
    def daemons(self) -> list[str]:
        return list(self.samples)

    def value(self, daemon: str) -> float | None:
        s = self.samples.get(daemon)
        return statistics.median(s) if s else None

    def ratio(self, daemon: str) -> float | None:
        v, ref = self.value(daemon), self.value(self.reference)
        if v is None or ref is None or ref == 0 or daemon == self.reference:
            return None
        return v / ref

    def relative(self, daemon: str) -> float | None:
        r = self.ratio(daemon)
        if r is None:
            return None
        if self.better == "higher":
            return r
        return 1 / r if r else math.inf

    def met(self, daemon: str) -> bool | None:
        rel = self.relative(daemon)
        if rel is None or self.target is None:
            return None
        return rel >= self.target

    def compared(self) -> list[str]:
        """The daemons compared with the reference, pyvirtiofsd first."""
        return [
            d
            for d in self.daemons
            if d != self.reference and d not in self.context and self.value(d) is not None
        ]

    def to_json(self) -> dict[str, Any]:
        daemons: dict[str, Any] = {}
        for d in self.daemons:
            entry: dict[str, Any] = {
                "value": self.value(d),
                "rounds": self.samples[d],
                "ratio": self.ratio(d),
                "relative": self.relative(d),
                "met": self.met(d),
            }
            extra = self.extra.get(d)
            if extra:
                entry["extra"] = {
                    name: {"value": statistics.median(v), "rounds": v} for name, v in extra.items()
                }
            daemons[d] = entry
        return {
            "part": self.part,
            "workload": self.key,
            "label": self.label,
            "unit": self.unit,
            "better": self.better,
            "reference": self.reference,
            "target": self.target,
            "daemons": daemons,
        }


def _round(v: Any) -> Any:
    """Six significant digits: more than any figure here can claim."""
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def label(daemon: str) -> str:
    return LABELS.get(daemon, daemon)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _target_text(row: Row) -> str:
    if row.target is None:
        return ""
    # State the bound as issue 10 does: on the ratio itself.
    if row.better == "higher":
        return f">={row.target:.3g}x"
    return f"<={1 / row.target:.3g}x"


def table(rows: list[Row], titles: dict[str, str] | None = None) -> str:
    """One text table: a section per part; per workload each daemon's median, then each
    compared daemon's ratio to the reference and whether it meets its target."""
    titles = titles or {}
    lines: list[str] = []
    parts: list[str] = []
    for r in rows:
        if r.part not in parts:
            parts.append(r.part)
    for part in parts:
        prows = [r for r in rows if r.part == part]
        daemons: list[str] = []
        for r in prows:
            for d in [r.reference, *r.compared(), *r.context]:
                if d not in daemons and d in r.samples:
                    daemons.append(d)
        # pyvirtiofsd first, then the references, then variants, then context (a ceiling).
        refs = {r.reference for r in prows}
        context = {d for r in prows for d in r.context}
        daemons.sort(key=lambda d: (d != PY, d not in refs, d in context))
        measured_refs = [d for d in daemons if d in refs]
        compared = [d for d in daemons if d not in refs and d not in context]
        if not measured_refs:
            compared = []
        ref_names = " / ".join(label(d) for d in measured_refs) or "no reference measured"
        head = ["workload", "unit", *(label(d) for d in daemons)]
        head += ["ratio" if d == PY else f"{label(d)} ratio" for d in compared]
        head.append("target")
        body = []
        for r in prows:
            cells = [r.label, r.unit, *(_fmt(r.value(d)) for d in daemons)]
            for d in compared:
                ratio, met = r.ratio(d), r.met(d)
                mark = "" if met is None else (" ok" if met else " MISS")
                cells.append("-" if ratio is None else f"{ratio:.2f}x{mark}")
            cells.append(_target_text(r))
            body.append(cells)
        widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]

        def fmt(cells: list[str], widths: list[int] = widths) -> str:
            out = [f"{cells[0]:<{widths[0]}}", f"{cells[1]:<{widths[1]}}"]
            out += [f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:], strict=True)]
            return "  ".join(out).rstrip()

        lines.append("")
        against = f"ratio = value / {ref_names}" if measured_refs else ref_names
        lines.append(f"== {titles.get(part, part)} ({against}) ==")
        lines.append(fmt(head))
        lines.append("-" * len(fmt(head)))
        lines += [fmt(c) for c in body]
    lines.append("")
    lines.append(
        "Medians over rounds. ok/MISS: against issue 10's target, given as a bound on the "
        "ratio\n(lower is better for times, us/op and us/req; higher for rates)."
    )
    return "\n".join(lines)


def to_json(rows: list[Row], meta: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, **meta, "workloads": [_round(r.to_json()) for r in rows]}


def run_params(args: dict[str, Any]) -> dict[str, Any]:
    """A run's options as its JSON records them: paths left out (where the JSON went, which
    compiled tree: the tree's own facts say what it was), since they are this machine's."""
    return {k: v for k, v in args.items() if not isinstance(v, Path)}


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(to_json(rows, meta), indent=2, ensure_ascii=False) + "\n")


def write_json_if(
    path: Path | None,
    rows: list[Row],
    part: str,
    args: dict[str, Any],
    tree: Any = None,
    why_not: str | None = None,
) -> None:
    """The end of a script's run: say what the compiled column could not measure, and write
    the rows to ``path`` (if given) with the run's options and the compiled tree's facts
    (``tree``: a ``compiled.Tree``, or None)."""
    if why_not is not None:
        print(f"NOT MEASURED: {label(PYC)}: {why_not}")
    if path is None:
        return
    meta: dict[str, Any] = {"parts": {part: run_params(args)}}
    if tree is not None:
        meta["facts"] = {"compiled": tree.describe()}
    write_json(path, rows, meta)
    print(f"results written to {path}")


# --- chart ---------------------------------------------------------------------------------------

_LO, _HI = 0.05, 20.0  # the log axis of `relative`
_COLOURS = {True: "#2e7d32", False: "#e65100", None: "#607d8b"}


def chart_svg(rows: list[Row], title: str, subtitle: str = "", titles: dict | None = None) -> str:
    """A horizontal bar per compared daemon and workload: its `relative` on a log axis, with
    the 1.0 line (level with the reference) and a tick at the row's target. Green bars meet
    their target, orange ones miss it, grey ones have none."""
    titles = titles or {}
    bar_h, gap, head_h = 14, 4, 24
    left, plot_w, right = 360, 560, 120
    top = 70
    entries: list[tuple[str, Any]] = []  # ("part", title) or ("bar", (row, daemon))
    part = None
    for r in rows:
        if r.part != part:
            part = r.part
            entries.append(("part", titles.get(part, part)))
        for d in r.compared():
            if r.relative(d) is not None:
                entries.append(("bar", (r, d)))
    height = top + sum(head_h if k == "part" else bar_h + gap for k, _ in entries) + 60
    width = left + plot_w + right

    def x(rel: float) -> float:
        rel = min(max(rel, _LO), _HI)
        return left + plot_w * (math.log10(rel) - math.log10(_LO)) / (
            math.log10(_HI) - math.log10(_LO)
        )

    out: list[str] = []
    add = out.append
    add(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" '
        'font-size="11">'
    )
    add(f'<rect width="{width}" height="{height}" fill="white"/>')
    add(f'<text x="10" y="20" font-size="15" font-weight="bold">{html.escape(title)}</text>')
    if subtitle:
        add(f'<text x="10" y="38" fill="#444">{html.escape(subtitle)}</text>')
    add(
        '<text x="10" y="56" fill="#444">bar: pyvirtiofsd against the reference, above 1 is '
        "better (rate ratio, or inverse time/CPU ratio); green meets issue 10's target "
        "(black tick), orange misses it, grey has none</text>"
    )
    bottom = height - 40
    for tick in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20):
        tx = x(tick)
        colour, w = ("#000", 1.5) if tick == 1 else ("#ddd", 1)
        add(f'<line x1="{tx:.1f}" y1="{top - 6}" x2="{tx:.1f}" y2="{bottom}" '
            f'stroke="{colour}" stroke-width="{w}"/>')  # fmt: skip
        add(f'<text x="{tx:.1f}" y="{bottom + 14}" text-anchor="middle">{tick:g}</text>')
    add(
        f'<text x="{left + plot_w / 2}" y="{bottom + 30}" text-anchor="middle" fill="#444">'
        "relative to the reference (log scale)</text>"
    )
    y = top
    for kind, item in entries:
        if kind == "part":
            add(f'<text x="10" y="{y + 16}" font-weight="bold">{html.escape(item)}</text>')
            y += head_h
            continue
        r, d = item
        rel = r.relative(d)
        name = r.label if d == PY else f"{r.label} ({label(d)})"
        add(
            f'<text x="{left - 6}" y="{y + bar_h - 3}" text-anchor="end">{html.escape(name)}</text>'
        )
        x0, x1 = x(1.0), x(rel)
        lo, hi = min(x0, x1), max(x0, x1)
        colour = _COLOURS[r.met(d)]
        opacity = "1" if d == PY else "0.55"
        add(
            f'<rect x="{lo:.1f}" y="{y}" width="{max(hi - lo, 1):.1f}" height="{bar_h}" '
            f'fill="{colour}" fill-opacity="{opacity}"/>'
        )
        if r.target is not None:
            tx = x(r.target)
            add(
                f'<line x1="{tx:.1f}" y1="{y - 2}" x2="{tx:.1f}" y2="{y + bar_h + 2}" '
                'stroke="#000" stroke-width="2"/>'
            )
        clipped = "" if _LO <= rel <= _HI else " (off scale)"
        add(f'<text x="{left + plot_w + 6}" y="{y + bar_h - 3}">{rel:.2f}{clipped}</text>')
        y += bar_h + gap
    add("</svg>")
    return "\n".join(out) + "\n"
