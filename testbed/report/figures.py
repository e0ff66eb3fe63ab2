"""The report's per-step figures: each rank's loss under the global loss, the dispersion metrics per
step, and the last pairwise cosine matrices. Each function takes already-loaded runs and writes one
PNG (shared helpers: ``report/plotting.py``). The evidence figure is ``evidence_figure.py``, the
ladder of a sweep ``ladder.py``.

A run here is anything with ``label`` (legend text) and ``rows`` (metrics.jsonl rows, or the bucket
means of a long record: ``record/digest.py``); ``dispersion_vs_step`` also reads ``verdict``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from testbed.report.plotting import (PlottedRun, colors, legend_columns, maybe_log, measured, moving_mean,
                                     plain_text, save, series, shorten, wrap)

GLOBAL_LOSS = "global loss = mean of the ranks"
LABEL_CHARS = 40  # legend entries and panel titles are cut to this many characters


@plain_text
def rank_losses(runs: Sequence[PlottedRun], path: Path, title: str, panel_titles: Sequence[str] | None = None,
                sharey: bool = False) -> Path:
    """Small multiples, one panel per run: each rank's loss (thin) under the global loss (black).

    The picture behind the project: the global mean is smooth and can look healthy while the
    ranks underneath it disagree. ``sharey`` for levels of one sweep (comparable scales). The legend
    sits below the panels in as many columns as fit the figure's width.
    """
    n = len(runs)
    cols = min(n, 3)
    rows_n = math.ceil(n / cols)
    fig = Figure(figsize=(max(4.8 * cols, 6.4), 3.3 * rows_n + 1.2), layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False, sharey=sharey)
    world = max((len(r["loss"]) for run in runs for r in measured(run.rows)), default=0)
    palette = colors(world)
    handles: dict[str, Any] = {}
    for k, (ax, run) in enumerate(zip(axes.flat, runs)):
        rows = measured(run.rows)
        steps = [r["step"] for r in rows]
        losses = []
        for rank in range(max((len(r["loss"]) for r in rows), default=0)):
            loss = np.array([np.nan if r["loss"][rank] is None else r["loss"][rank] for r in rows], dtype=float)
            losses.append(loss)
            (line,) = ax.plot(steps, loss, lw=0.9, alpha=0.8, color=palette[rank])
            handles.setdefault(f"rank {rank}", line)
        _, global_loss = series(rows, "global_loss")
        (line,) = ax.plot(steps, global_loss, lw=2.4, color="black")
        handles.setdefault(GLOBAL_LOSS, line)
        ax.set_title(shorten(panel_titles[k] if panel_titles else run.label, LABEL_CHARS), fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not sharey or k % cols == 0:
            maybe_log(ax, np.concatenate(losses) if losses else np.array([]), "loss")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    shown = handles if world <= 16 else {"each rank": next(iter(handles.values())), GLOBAL_LOSS: handles[GLOBAL_LOSS]}
    fig.legend(list(shown.values()), list(shown.keys()), loc="outside lower center", fontsize=8,
               ncols=legend_columns(fig, list(shown.keys()), 8))
    fig.suptitle(wrap(title, fig.get_figwidth(), 12))
    return save(fig, path)


DISPERSION_PANELS: tuple[tuple[str, str], ...] = (
    ("loss_cv", "loss CV over ranks"),
    ("grad_norm_cv", "grad-norm CV over ranks"),
    ("cos_mean", "mean cos(g_i, mean g)"),
)


@plain_text
def dispersion_vs_step(runs: Sequence[PlottedRun], path: Path, title: str, legend_title: str | None = None) -> Path:
    """One panel per dispersion metric, one line per run (e.g. per ladder level).

    Per-step values are noisy (each is a statistic of N numbers), so with ≥ 15 steps they are
    drawn thin and a centred moving mean is drawn thick over them (the mean smears a one-step
    spike over its window: the thin line shows the step). Vertical lines mark what the run's verdict
    found (``verdict_marks``): dotted, the step its evidence starts; dashed, the first weight
    divergence. The legend sits to the right of the panels, never over the data.
    """
    fig = Figure(figsize=(10.5, 9.5), layout="constrained")
    axes = fig.subplots(len(DISPERSION_PANELS), 1, sharex=True)
    palette = colors(len(runs))
    longest = max((len(measured(r.rows)) for r in runs), default=0)
    window = max(3, longest // 10) if longest >= 15 else 0
    for ax, (key, label) in zip(axes, DISPERSION_PANELS):
        plotted: list[np.ndarray] = []
        for run, color in zip(runs, palette):
            steps, values = series(run.rows, key)
            plotted.append(values)
            if window:
                ax.plot(steps, values, lw=0.8, alpha=0.45, color=color)
                ax.plot(steps, moving_mean(values, window), lw=2.0, color=color)
            else:
                ax.plot(steps, values, lw=1.4, color=color, marker=".")
        hidden = [run.label for run, v in zip(runs, plotted) if not (v[np.isfinite(v)] > 0).any()]
        maybe_log(ax, np.concatenate(plotted) if plotted else np.array([]), label, hidden)
        ax.grid(alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
    styles: set[str] = set()
    for run, color in zip(runs, palette):
        for step, style in verdict_marks(run):
            styles.add(style)
            for ax in axes:
                ax.axvline(step, color=color, ls=style, lw=1.2)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=c, lw=2.0) for c in palette]
    labels = [shorten(run.label, LABEL_CHARS) for run in runs]
    for style, text in ((":", "the verdict's evidence starts"), ("--", "weights diverge")):
        if style in styles:
            handles.append(Line2D([], [], color="0.3", ls=style, lw=1.2))
            labels.append(text)
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=legend_title and shorten(legend_title, 30),
               title_fontsize=8)
    fig.suptitle(wrap(title + (f"\n(thin: per step; thick: moving mean over {window} steps)" if window else ""),
                      fig.get_figwidth(), 12))
    return save(fig, path)


def verdict_marks(run: PlottedRun) -> list[tuple[int, str]]:
    """(step, line style) of what the run's verdict found: where its evidence starts (``since_step``)
    and the first weight divergence."""
    verdict = getattr(run, "verdict", None) or {}
    marks = []
    if isinstance(verdict.get("since_step"), int) and verdict.get("status") in ("inconsistent", "diverged"):
        marks.append((verdict["since_step"], ":"))
    for item in verdict.get("evidence") or []:
        if isinstance(item, dict) and item.get("kind") == "divergence":
            step = (item.get("effect") or {}).get("since_step")
            if isinstance(step, int):
                marks.append((step, "--"))
                break
    return marks


@plain_text
def pairwise_heatmaps(items: Sequence[tuple[str, int, Sequence[Sequence[float | None]]]], path: Path,
                      title: str) -> Path:
    """Small multiples of N×N cosine matrices of the ranks' local gradients, one per
    ``(panel title, step, matrix)``. Fixed colour range [-1, 1] so panels compare; the diagonal
    (always 1) and undefined entries are grey, so the colours are the off-diagonal pairs."""
    from matplotlib import colormaps

    n_panels = len(items)
    cols = min(n_panels, 5)
    rows_n = math.ceil(n_panels / cols)
    size = max((len(m) for _, _, m in items), default=1)
    cell = min(0.6 * size + 1.6, 5.0)
    fig = Figure(figsize=(max(cell * cols + 1.0, 5.0), cell * rows_n + 1.4), layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.82")
    image = None
    for ax, (panel, step, matrix) in zip(axes.flat, items):
        m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
        n = m.shape[0]
        off = m[~np.eye(n, dtype=bool)]
        off_mean = float(np.nanmean(off)) if np.isfinite(off).any() else float("nan")
        np.fill_diagonal(m, np.nan)
        image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-1, vmax=1)
        ticks = range(n) if n <= 16 else range(0, n, max(1, n // 8))
        ax.set_xticks(list(ticks), [str(i) for i in ticks], fontsize=8)
        ax.set_yticks(list(ticks), [str(i) for i in ticks], fontsize=8)
        ax.set_xlabel("rank j", fontsize=8)
        ax.set_ylabel("rank i", fontsize=8)
        if n <= 10:
            for i in range(n):
                for j in range(n):
                    if i != j and np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(m[i, j]) > 0.6 else "black")
        ax.set_title(f"{shorten(panel, int(cell * 12))}\nstep {step}, mean off-diagonal {off_mean:.3f}", fontsize=9)
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label="cosine(g_i, g_j)", shrink=0.9)
    fig.suptitle(wrap(f"{title}\n(g_i: rank i's local gradient before the all-reduce)", fig.get_figwidth(), 12))
    return save(fig, path)
