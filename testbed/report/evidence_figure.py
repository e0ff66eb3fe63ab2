"""The evidence figure: where the verdict's evidence is — which rank, from which step, on which metric.

One panel per per-rank metric (loss, gradient norm, cosine to the mean gradient): ranks down,
steps across, each cell coloured by the rank's standardized deviation at that step
(``deviations.py``: the verdict's own standardization, clipped at ±3). Over it:

- the verdict's suspects: red rank labels; each rank's Σu on the right (how far it sat, in total);
- ``since_step`` / ``until_step``: dashed vertical lines, labelled on top;
- the findings (``explain.findings``), numbered as in the list under the panels and the page's
  table: a box over the ranks and steps of a persistent finding, ○ a spike's peak, × a non-finite
  value, ◇ an exact cause (data, state, config) or a weight divergence at its rank and step
  (a dash-dotted line when it names no rank).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from testbed.diagnose.text import LABELS
from testbed.diagnose.exchangeability import CLIP
from testbed.report.deviations import DeviationMap
from testbed.report.explain import Finding, explanation
from testbed.report.plotting import plain_text, save, shorten, wrap

WIDTH_IN = 11.0
LIST_LINES = 12  # findings listed under the panels (all of them are in the page's table)
MARKERS = {"transient": "o", "nonfinite": "X"}  # others with a step: "D"
SUSPECT = "#c0392b"
LEGEND = ("colour: a rank's deviation from the step's median over ranks, in robust spreads (the verdict's "
          "standardization, clipped at ±3). Red rank labels: the verdict's suspects; Σ: a rank's sum over steps. "
          "Numbered marks: the findings below (box: a finding's ranks and steps; ○ spike; × non-finite; "
          "◇ exact cause or divergence). Dashed: where the verdict's evidence starts and ends.")


@plain_text
def evidence_figure(label: str, verdict: Mapping[str, Any], maps: Sequence[DeviationMap], found: Sequence[Finding],
                    path: Path) -> Path | None:
    """Draw the figure (module doc); None when there is nothing to compare (no rank pairs)."""
    maps = [m for m in maps if m.u.shape[1] >= 2 and m.steps]
    if not maps:
        return None
    n = maps[0].u.shape[1]
    panel_h = float(np.clip(0.22 * n + 1.0, 1.5, 4.5))
    listed = _listed(found, str(verdict.get("status")))
    notes_h = 0.16 * (len(listed) + 3) + 0.3
    fig = Figure(figsize=(WIDTH_IN, panel_h * len(maps) + notes_h + 1.2), layout="constrained")
    grid = fig.add_gridspec(len(maps) + 1, 1, height_ratios=[panel_h] * len(maps) + [notes_h])
    axes = [fig.add_subplot(grid[0])]
    axes += [fig.add_subplot(grid[k], sharex=axes[0]) for k in range(1, len(maps))]
    suspects = {r for r in verdict.get("ranks") or [] if isinstance(r, int)}
    mesh = None
    for ax, m in zip(axes, maps):
        mesh = _panel(ax, m, suspects, [f for f in found if f.metric in (None, m.metric)])
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("step")
    _span(axes, verdict, maps[0].steps)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes, label="standardized deviation u", shrink=0.9, pad=0.02)
    notes = fig.add_subplot(grid[len(maps)])
    notes.axis("off")
    notes.text(0, 1, wrap("\n".join([*listed, "", LEGEND]), WIDTH_IN - 0.6, 8), transform=notes.transAxes,
               va="top", ha="left", fontsize=8)
    fig.suptitle(wrap(f"{label}: where the evidence is\n{explanation(verdict)}", WIDTH_IN - 0.4, 11))
    return save(fig, path)


def _listed(found: Sequence[Finding], status: str) -> list[str]:
    lines = [f.line() for f in found[:LIST_LINES]]
    if len(found) > LIST_LINES:
        lines.append(f"… {len(found) - LIST_LINES} more finding(s) in the report's table")
    if not lines:
        lines = ["no findings: nothing stands out beyond chance" if status == "consistent"
                 else "no evidence items in the record's verdict"]
    return lines


def _edges(steps: Sequence[int]) -> np.ndarray:
    """Cell edges around each step: halfway to its neighbours (steps need not be evenly spaced)."""
    s = np.asarray(steps, dtype=float)
    if s.size == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _edge(step: int, steps: Sequence[int], x: np.ndarray) -> float:
    """The left edge of the first cell at or after ``step`` (the right end when none is)."""
    return float(x[int(np.searchsorted(np.asarray(steps), step, side="left"))])


def _panel(ax: Any, m: DeviationMap, suspects: set[int], found: Sequence[Finding]) -> Any:
    n = m.u.shape[1]
    x = _edges(m.steps)
    mesh = ax.pcolormesh(x, np.arange(n + 1) - 0.5, m.u.T, cmap="RdBu_r", vmin=-CLIP, vmax=CLIP, shading="flat")
    ax.set_ylim(n - 0.5, -0.5)  # rank 0 on top
    shown = list(range(n)) if n <= 16 else sorted(set(range(0, n, max(1, n // 8))) | suspects)
    ax.set_yticks(shown, [f"rank {r}" for r in shown], fontsize=8)
    for tick, r in zip(ax.get_yticklabels(), shown):
        if r in suspects:
            tick.set_color(SUSPECT)
            tick.set_fontweight("bold")
    if n <= 16:
        right = ax.secondary_yaxis("right")
        right.set_yticks(list(range(n)), [f"Σ {s:+.0f}" for s in m.sums], fontsize=7)
    label = LABELS.get(m.metric, m.metric) + (" (log)" if m.log_scale else "")
    ax.set_title(shorten(f"{label}: {_panel_note(m, found)}", 150), fontsize=9, loc="left")
    for f in found:
        _mark(ax, f, m.steps, x, n)
    return mesh


def _panel_note(m: DeviationMap, found: Sequence[Finding]) -> str:
    mine = [f for f in found if f.metric == m.metric]
    parts = [m.spread_note()] if m.spread_note() else []
    if mine:
        parts.append("finding " + ", ".join(f"[{f.number}] {f.certainty}" for f in mine))
    elif not parts:
        parts.append("no finding on this metric")
    if m.dropped:
        parts.append(f"{m.dropped} step(s) left out (a rank not finite)")
    return "; ".join(parts)


def _mark(ax: Any, f: Finding, steps: Sequence[int], x: np.ndarray, n: int) -> None:
    """A finding on a panel: a box over its ranks and span, or a marker at its step, numbered."""
    ranks = [r for r in f.ranks if 0 <= r < n]
    if f.kind == "persistent" and f.since is not None:
        lo = _edge(f.since, steps, x)
        hi = x[-1] if f.until is None else _edge(f.until, steps, x)
        for r in ranks:
            ax.add_patch(Rectangle((lo, r - 0.5), max(hi - lo, 0.0), 1.0, fill=False, ec="black", lw=1.6))
            ax.text(lo, r - 0.5, f" {f.number}", va="top", ha="left", fontsize=7, clip_on=True,
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
        return
    if f.step is None:
        return
    if not ranks:
        ax.axvline(f.step, color="black", ls="-.", lw=1.0)
        ax.text(f.step, -0.5, f" {f.number}", va="top", ha="left", fontsize=7, clip_on=True)
        return
    for r in ranks:
        ax.plot([f.step], [r], marker=MARKERS.get(f.kind, "D"), ms=9, mfc="none", mec="black", mew=1.6)
        ax.annotate(str(f.number), (f.step, r), xytext=(6, -6), textcoords="offset points", fontsize=7,
                    annotation_clip=True, bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none"})


def _span(axes: Sequence[Any], verdict: Mapping[str, Any], steps: Sequence[int]) -> None:
    """``since_step`` / ``until_step`` as dashed lines over every panel, named on the top one."""
    if verdict.get("status") not in ("inconsistent", "diverged"):
        return
    ticks = [(verdict.get(k), f"{word} step {verdict.get(k)}") for k, word in (("since_step", "since"),
                                                                               ("until_step", "until"))]
    x = _edges(steps)
    at = [(_edge(s, steps, x), t) for s, t in ticks if isinstance(s, int)]
    for ax in axes:
        for edge, _ in at:
            ax.axvline(edge, color="black", ls="--", lw=1.2)
    if at:
        top = axes[0].secondary_xaxis("top")
        top.set_xticks([e for e, _ in at], [t for _, t in at], fontsize=8)
