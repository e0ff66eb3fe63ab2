"""The report's figures, drawn with matplotlib's object API (``Figure`` + Agg: no pyplot state,
no display needed). Each function takes already-loaded runs and writes one PNG.

A run here is anything with ``label`` (legend text) and ``rows`` (metrics.jsonl rows, or the bucket
means of a long record: ``record/digest.py``); the report module supplies them. Text is drawn as
plain text (``@plain_text``): a scenario or level name such as ``a$^$b`` was parsed as mathtext and
crashed the report after the sweep had succeeded. PNGs are written atomically (a full disk left a
0-byte PNG). Axes switch to a log scale when the plotted positive values span at least
two decades; values ≤ 0 cannot be drawn there and the axis label says so.
"""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from testbed.record.safeio import write_bytes_atomic
from matplotlib.ticker import MaxNLocator

LOG_SPAN = 100.0  # max/min of the positive values at which an axis goes logarithmic
DPI = 110


class PlottedRun(Protocol):
    label: str
    rows: list[dict[str, Any]]


def measured(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with per-rank metrics (rows that only carry a weight check are skipped)."""
    return [r for r in rows if isinstance(r.get("loss"), list)]


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar metric, NaN where it is undefined (JSON null)."""
    rows = measured(rows)
    steps = np.array([r["step"] for r in rows], dtype=float)
    values = np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=float)
    return steps, values


def _maybe_log(ax: Any, values: np.ndarray, label: str, hidden: Sequence[str] = ()) -> bool:
    """Label the y axis; go logarithmic if the positive values span ≥ LOG_SPAN. On a log axis,
    say inside the panel that values ≤ 0 are not drawn, naming the ``hidden`` series (those with
    no positive value at all, which would otherwise vanish without a trace)."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    log = bool(positive.size and positive.max() / positive.min() >= LOG_SPAN)
    if log:
        ax.set_yscale("log")
        if (finite <= 0).any():
            note = "log scale: values ≤ 0 not drawn"
            if hidden:
                note += f" ({', '.join(hidden)}: ≤ 0 at every step)"
            ax.text(0.01, 0.02, note, transform=ax.transAxes, fontsize=7, color="0.35")
    ax.set_ylabel(label + ("  (log)" if log else ""))
    return log


F = TypeVar("F", bound=Callable[..., Any])


def plain_text(draw: F) -> F:
    """Every text of the figure ``draw`` makes is literal: no mathtext, no LaTeX (names are the user's)."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return draw(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _save(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis" if n > 10 else "tab10"]
    return [cmap(i / max(n - 1, 1)) if n > 10 else cmap(i) for i in range(n)]


@plain_text
def rank_losses(runs: Sequence[PlottedRun], path: Path, title: str, panel_titles: Sequence[str] | None = None,
                sharey: bool = False) -> Path:
    """Small multiples, one panel per run: each rank's loss (thin) under the global loss (black).

    The picture behind the project: the global mean is smooth and can look healthy while the
    ranks underneath it disagree. ``sharey`` for levels of one sweep (comparable scales).
    """
    n = len(runs)
    cols = min(n, 3)
    rows_n = math.ceil(n / cols)
    fig = Figure(figsize=(4.8 * cols, 3.3 * rows_n + 1.0), layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False, sharey=sharey)
    world = max((len(r["loss"]) for run in runs for r in measured(run.rows)), default=0)
    colors = _colors(world)
    handles: dict[str, Any] = {}
    for k, (ax, run) in enumerate(zip(axes.flat, runs)):
        rows = measured(run.rows)
        steps = [r["step"] for r in rows]
        losses = []
        for rank in range(max((len(r["loss"]) for r in rows), default=0)):
            loss = np.array([np.nan if r["loss"][rank] is None else r["loss"][rank] for r in rows], dtype=float)
            losses.append(loss)
            (line,) = ax.plot(steps, loss, lw=0.9, alpha=0.8, color=colors[rank])
            handles.setdefault(f"rank {rank}", line)
        _, global_loss = series(rows, "global_loss")
        (line,) = ax.plot(steps, global_loss, lw=2.4, color="black")
        handles.setdefault("global loss (mean of ranks)", line)
        ax.set_title(panel_titles[k] if panel_titles else run.label, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not sharey or k % cols == 0:
            _maybe_log(ax, np.concatenate(losses) if losses else np.array([]), "loss")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    shown = handles if world <= 16 else {"each rank": next(iter(handles.values())),
                                         "global loss (mean of ranks)": handles["global loss (mean of ranks)"]}
    fig.legend(list(shown.values()), list(shown.keys()), loc="outside lower center",
               ncols=min(len(shown), 9), fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean that skips NaN (undefined steps) and shrinks at the ends."""
    out = np.full(values.shape, np.nan)
    half = window // 2
    for i in range(values.size):
        chunk = values[max(0, i - half):i + half + 1]
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            out[i] = chunk.mean()
    return out


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
    spike over its window: the thin line shows the step). Vertical lines mark the detectors'
    findings (``detector_events``): dotted, an outlier rank; dashed, the first weight divergence.
    """
    fig = Figure(figsize=(9.0, 9.5), layout="constrained")
    axes = fig.subplots(len(DISPERSION_PANELS), 1, sharex=True)
    colors = _colors(len(runs))
    longest = max((len(measured(r.rows)) for r in runs), default=0)
    window = max(3, longest // 10) if longest >= 15 else 0
    for ax, (key, label) in zip(axes, DISPERSION_PANELS):
        plotted: list[np.ndarray] = []
        for run, color in zip(runs, colors):
            steps, values = series(run.rows, key)
            plotted.append(values)
            if window:
                ax.plot(steps, values, lw=0.8, alpha=0.45, color=color)
                ax.plot(steps, moving_mean(values, window), lw=2.0, color=color, label=run.label)
            else:
                ax.plot(steps, values, lw=1.4, color=color, label=run.label, marker=".")
        hidden = [run.label for run, v in zip(runs, plotted) if not (v[np.isfinite(v)] > 0).any()]
        _maybe_log(ax, np.concatenate(plotted) if plotted else np.array([]), label, hidden)
        ax.grid(alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
    marked = 0
    for run, color in zip(runs, colors):
        marked += _mark_events(axes, run, color, marked)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8, loc="best", ncols=2 if len(runs) > 5 else 1, title=legend_title, title_fontsize=8)
    fig.suptitle(title + (f"\n(thin: per step; thick: moving mean over {window} steps)" if window else ""))
    return _save(fig, path)


def detector_events(run: PlottedRun) -> list[tuple[int, str, str]]:
    """(step, text, line style) of what the run's detectors found, from ``run.summary`` (if any):
    where the attributed outlier rank first stood out, and the first weight divergence."""
    summary = getattr(run, "summary", None) or {}
    events = []
    outlier = summary.get("outlier", {}).get("outlier")
    if outlier:
        events.append((outlier["step"], f"rank {outlier['rank']} stands out ({outlier['metric']})", ":"))
    if summary.get("first_weight_divergence_step") is not None:
        ranks = ", ".join(map(str, summary.get("first_weight_divergence_ranks") or []))
        events.append((summary["first_weight_divergence_step"], f"weights diverge (rank {ranks})", "--"))
    return events


def _mark_events(axes: Sequence[Any], run: PlottedRun, color: Any, slot: int) -> int:
    """Vertical lines at the run's detector events, labelled in the top panel (``slot``
    staggers the labels of several runs). Returns how many labels were drawn."""
    events = detector_events(run)
    for k, (step, text, style) in enumerate(events):
        for ax in axes:
            ax.axvline(step, color=color, ls=style, lw=1.2)
        axes[0].annotate(f"{run.label}: {text}", (step, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -12 - 11 * (slot + k)), textcoords="offset points", fontsize=8, color=color)
    return len(events)


@plain_text
def dispersion_vs_level(ticks: Sequence[str], positions: Sequence[float], runs: Sequence[PlottedRun],
                        path: Path, title: str, xlabel: str) -> Path:
    """Run mean of each dispersion metric against the desync level; bars: interquartile range
    over the run's steps (how steady the level's value is)."""
    fig = Figure(figsize=(13.0, 4.2), layout="constrained")
    axes = fig.subplots(1, len(DISPERSION_PANELS))
    x = np.asarray(positions, dtype=float)
    for ax, (key, label) in zip(axes, DISPERSION_PANELS):
        mean, low, high = [], [], []
        for run in runs:
            _, v = series(run.rows, key)
            v = v[np.isfinite(v)]
            mean.append(v.mean() if v.size else np.nan)
            low.append(np.percentile(v, 25) if v.size else np.nan)
            high.append(np.percentile(v, 75) if v.size else np.nan)
        m = np.asarray(mean)
        err = np.clip(np.vstack([m - np.asarray(low), np.asarray(high) - m]), 0, None)
        ax.errorbar(x, m, yerr=err, marker="o", capsize=4, lw=1.5)
        _maybe_log(ax, np.concatenate([m, low, high]), label)
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\n(dot: mean over the run's steps; bar: 25th–75th percentile of the steps)")
    return _save(fig, path)


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
    fig = Figure(figsize=(cell * cols + 1.0, cell * rows_n + 1.0), layout="constrained")
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
        ax.set_title(f"{panel}\nstep {step}, mean off-diagonal {off_mean:.3f}", fontsize=9)
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label="cosine(g_i, g_j)", shrink=0.9)
    fig.suptitle(f"{title}\n(g_i: rank i's local gradient before the all-reduce)")
    return _save(fig, path)
