"""The receipt page's plots, drawn server-side with matplotlib as inline SVG (no pyplot).

Each function takes the evidence it plots and returns a `Plot`: the SVG markup, or, when the
data is missing or unusable, no SVG and the sentence that says why. Text is drawn as paths,
so a page needs no fonts; the SVG ids are prefixed per plot so several figures can share one
HTML page, and the output is deterministic for the same input.
"""

from __future__ import annotations

import io
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

_LOCK = threading.Lock()  # rcParams are process-global; render one figure at a time
_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.S)
_IDS = re.compile(r'((?:\bid="|href="#|url\(#))([^")]+)')
COLORS = {"original": "#9a3412", "unlearned": "#1d4ed8", "reference": "#6b7280", "control": "#047857"}


@dataclass(frozen=True)
class Plot:
    """One figure of the page: its SVG, or the reason it could not be drawn."""

    key: str
    title: str
    svg: str | None
    missing: str | None = None


def _numbers(values: Any) -> list[float]:
    if not isinstance(values, list | tuple):
        return []
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(float(v))]


def _render(key: str, fig: Figure, label: str) -> str:
    buf = io.StringIO()
    with _LOCK, matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": f"lethe-{key}"}):
        FigureCanvasSVG(fig).print_svg(buf, metadata={"Date": None, "Creator": None})  # type: ignore[no-untyped-call]
    svg = _PROLOGUE.sub("", buf.getvalue(), count=1)
    # Ids unique across the page: every figure defines its own glyphs, clips and patches.
    svg = _IDS.sub(lambda m: f'{m.group(1)}{key}-{m.group(2)}', svg)
    return svg.replace("<svg ", f'<svg role="img" aria-label="{label}" class="plot" ', 1)


def _figure(width: float = 7.0, height: float = 3.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=96, layout="constrained")
    return fig


def confidence_distributions(scores: Any, *, why_missing: str | None = None) -> Plot:
    """(a) Logit-scaled confidence of the forget samples: original, unlearned, OUT references."""
    key, title = "confidence", "Confidence on the forget samples"
    if why_missing:
        return Plot(key, title, None, why_missing)
    scores = scores if isinstance(scores, dict) else {}
    series = [
        ("original model", _numbers(scores.get("forget_original")), COLORS["original"]),
        ("unlearned model", _numbers(scores.get("forget_unlearned")), COLORS["unlearned"]),
        ("OUT references", _numbers(scores.get("out_reference")), COLORS["reference"]),
    ]
    present = [s for s in series if s[1]]
    if not present:
        return Plot(key, title, None, "The job's evidence holds no per-sample confidence scores.")
    values = [v for _, vs, _ in present for v in vs]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    fig = _figure()
    ax = fig.add_subplot()
    for name, vs, color in present:
        ax.hist(vs, bins=24, range=(lo, hi), density=True, histtype="stepfilled", alpha=0.35,
                color=color, edgecolor=color, linewidth=1.4, label=f"{name} (n={len(vs)})")
    ax.set_xlabel("logit-scaled confidence of the true label")
    ax.set_ylabel("density")
    ax.legend(frameon=False, fontsize=8)
    missing = [name for name, vs, _ in series if not vs]
    if missing:
        ax.set_title("not recorded: " + ", ".join(missing), fontsize=8, loc="left")
    return Plot(key, title, _render(key, fig, title))


def per_class_accuracy(data: Any) -> Plot:
    """(b) Accuracy per class on the audit split, before and after."""
    key, title = "per_class", "Accuracy per class on audit data, before and after"
    data = data if isinstance(data, dict) else {}
    classes = data.get("classes")
    before, after = _numbers(data.get("before")), _numbers(data.get("after"))
    if not isinstance(classes, list) or not classes or not len(before) == len(after) == len(classes):
        return Plot(key, title, None, "The job's evidence holds no per-class accuracy on audit data.")
    counts = data.get("n") if isinstance(data.get("n"), list) else None
    labels = [
        f"{c}\n(n={counts[i]})" if counts and i < len(counts) else str(c) for i, c in enumerate(classes)
    ]
    fig = _figure(width=max(5.0, 0.55 * len(classes) + 2.5))
    ax = fig.add_subplot()
    xs = range(len(classes))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, color=COLORS["original"], label="before (base version)")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, color=COLORS["unlearned"], label="after (result)")
    ax.set_xticks(list(xs), labels, fontsize=7 if len(classes) > 12 else 8)
    ax.set_ylim(0, 1.22)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("accuracy")
    ax.set_xlabel("class")
    ax.legend(frameon=False, fontsize=8, loc="upper center", ncol=2)
    return Plot(key, title, _render(key, fig, title))


def _curves(history: Sequence[Any], field: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or not isinstance(entry.get(field), dict):
            continue
        step = entry.get("step", i)
        for name, value in entry[field].items():
            finite = isinstance(value, int | float) and math.isfinite(float(value))
            if finite and isinstance(step, int | float):
                xs, ys = out.setdefault(str(name), ([], []))
                xs.append(float(step))
                ys.append(float(value))
    return out


def training_curves(history: Any) -> Plot:
    """(c) The job's loss and balance-weight curves, step by step."""
    key, title = "curves", "The job's losses and balance weights"
    if not isinstance(history, list) or not history:
        return Plot(key, title, None, "The job's step history was not recorded.")
    losses, weights = _curves(history, "losses"), _curves(history, "weights")
    if not losses and not weights:
        return Plot(key, title, None, "The job's step history holds no losses or weights.")
    fig = _figure(height=3.0)
    panels = [("loss", losses), ("balance weight", weights)]
    axes = fig.subplots(1, 2)
    palette = ["#1d4ed8", "#9a3412", "#047857", "#7c3aed"]
    for ax, (label, curves) in zip(axes, panels, strict=True):
        if not curves:
            ax.text(0.5, 0.5, f"no {label} recorded", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for i, (name, (xs, ys)) in enumerate(sorted(curves.items())):
            ax.plot(xs, ys, color=palette[i % len(palette)], linewidth=1.4, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(frameon=False, fontsize=8)
    return Plot(key, title, _render(key, fig, title))


def flag_rates(test: Any, *, why_missing: str | None = None) -> Plot:
    """(d) Flag rates at alpha with their intervals: forget (unlearned), control, original."""
    key, title = "flag_rates", "Samples flagged as members, with 95% intervals"
    if why_missing:
        return Plot(key, title, None, why_missing)
    test = test if isinstance(test, dict) else {}
    rows = []
    for name, label, color in (
        ("forget", "forget set, unlearned model", COLORS["unlearned"]),
        ("control", "control (never trained on)", COLORS["control"]),
        ("original", "forget set, original model", COLORS["original"]),
    ):
        group = test.get(name)
        if not isinstance(group, dict) or not isinstance(group.get("rate"), int | float):
            continue
        interval = _numbers(group.get("interval"))
        rate = float(group["rate"])
        lo, hi = (interval[0], interval[1]) if len(interval) == 2 else (rate, rate)
        count = f"{group.get('flagged', '?')}/{group.get('n', '?')}"
        rows.append((f"{label}\n{count}", rate, max(0.0, rate - lo), max(0.0, hi - rate), color))
    if not rows:
        return Plot(key, title, None, "The job's evidence holds no flag rates.")
    fig = _figure(height=0.8 * len(rows) + 1.2)
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    for y, (_, rate, below, above, color) in zip(ys, rows, strict=True):
        ax.errorbar([rate], [y], xerr=[[below], [above]], fmt="o", color=color, capsize=5, markersize=7)
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8)
    alpha = test.get("alpha")
    if isinstance(alpha, int | float):
        ax.axvline(float(alpha), color="#111827", linestyle=":", linewidth=1)
        ax.text(float(alpha), max(ys) + 0.45, f" alpha = {alpha:g}", fontsize=8, va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, max(ys) + 0.7)
    ax.set_xlabel("fraction flagged at alpha")
    return Plot(key, title, _render(key, fig, title))
