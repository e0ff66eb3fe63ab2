"""What every figure of the report shares: the rows it plots, literal text, log axes, colours,
legends and titles that fit, and one way to write a PNG that checks its own layout.

Figures are drawn with matplotlib's object API (``Figure`` + Agg: no pyplot state, no display).
Text is literal (``plain_text``): a scenario or level name such as ``a$^$b`` was parsed as mathtext
and crashed the report after the sweep had succeeded. Because mathtext is off, a log axis gets a
plain tick formatter (matplotlib's default writes ``$\\mathdefault{10^{-2}}$``, which was then drawn
as those characters). ``save`` draws a figure once, checks that every text, legend and axes lies
inside it (``layout_problems``: a clipped legend read "global loss (mean of ra…") and warns with
``LayoutWarning`` when one does not, then writes the PNG atomically (a full disk left a 0-byte PNG).
"""
from __future__ import annotations

import functools
import io
import math
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

import matplotlib
import matplotlib.image
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, NullFormatter

from testbed.record.safeio import write_bytes_atomic

LOG_SPAN = 100.0  # max/min of the positive values at which an axis goes logarithmic
DPI = 110
SLACK_PX = 1.0  # extents may touch the figure's edge by this much (anti-aliasing)
RAW_MATH = "\\mathdefault"  # mathtext markup drawn as characters


class LayoutWarning(UserWarning):
    """A figure's text, legend or axes does not fit inside the figure (it would be cut off)."""


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


def _plain_number(value: float, _position: Any = None) -> str:
    return f"{value:g}"


def maybe_log(ax: Any, values: np.ndarray, label: str, hidden: Sequence[str] = ()) -> bool:
    """Label the y axis; go logarithmic if the positive values span ≥ LOG_SPAN. On a log axis,
    say inside the panel that values ≤ 0 are not drawn, naming the ``hidden`` series (those with
    no positive value at all, which would otherwise vanish without a trace)."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    log = bool(positive.size and positive.max() / positive.min() >= LOG_SPAN)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
        ax.yaxis.set_minor_formatter(NullFormatter())
        if (finite <= 0).any():
            note = "log scale: values ≤ 0 not drawn"
            if hidden:
                note += f" ({shorten(', '.join(hidden), 60)}: ≤ 0 at every step)"
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


def colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis" if n > 10 else "tab10"]
    return [cmap(i / max(n - 1, 1)) if n > 10 else cmap(i) for i in range(n)]


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (legend entries, panel titles)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:max(1, limit - 1)] + "…"


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped to a width of ``width_in`` inches at ``fontsize`` points (a character of
    DejaVu Sans averages ≈ 0.6 em), each of its lines separately."""
    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) if line else "" for line in str(text).split("\n"))


def legend_columns(fig: Figure, labels: Sequence[str], fontsize: float, most: int = 9) -> int:
    """How many legend columns of ``labels`` fit across ``fig``: the widest entry (handle, padding
    and spacing included, as matplotlib lays them out) measured with the Agg renderer."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    from matplotlib.font_manager import FontProperties

    font = FontProperties(size=fontsize)
    widest = max((renderer.get_text_width_height_descent(str(s), font, ismath=False)[0] for s in labels), default=0.0)
    em = fontsize * fig.dpi / 72
    column = widest + (2.0 + 0.8 + 2.0) * em  # handlelength + handletextpad + columnspacing
    usable = fig.bbox.width - 2 * em  # borderpad and the figure's own pad
    return int(max(1, min(most, len(labels), math.floor(usable / column) if column else most)))


def layout_problems(fig: Figure, renderer: Any) -> list[str]:
    """Texts, legends and axes (tick labels included) of a drawn figure that reach beyond it, and
    texts showing raw mathtext markup (math written for a text that is drawn literally); one line each."""
    box = fig.bbox
    problems = []

    def outside(extent: Any) -> bool:
        return (extent.x0 < box.x0 - SLACK_PX or extent.x1 > box.x1 + SLACK_PX
                or extent.y0 < box.y0 - SLACK_PX or extent.y1 > box.y1 + SLACK_PX)

    named: list[tuple[str, Any]] = []
    for ax in fig.axes:
        if ax.get_visible():
            named.append((f"axes {ax.get_title()!r} with its labels", ax))
    for artist in [*fig.legends, *fig.texts, *([fig._suptitle] if fig._suptitle else [])]:
        named.append((_describe(artist), artist))
    for ax in fig.axes:
        if ax.get_visible():
            named += [(_describe(a), a) for a in ax.texts + ([ax.get_legend()] if ax.get_legend() else [])]
    for what, artist in named:
        if not artist.get_visible():
            continue
        extent = artist.get_tightbbox(renderer) if hasattr(artist, "get_tightbbox") else None
        extent = extent if extent is not None else artist.get_window_extent(renderer)
        if extent is not None and outside(extent):
            problems.append(f"{what} reaches beyond the figure ({_px(extent, box)})")
    raw = sorted({t.get_text() for t in fig.findobj(Text) if RAW_MATH in t.get_text() and not t.get_parse_math()})
    if raw:
        problems.append(f"{len(raw)} text(s) show raw mathtext markup, e.g. {raw[0]!r}")
    return problems


def _describe(artist: Any) -> str:
    if isinstance(artist, Legend):
        return "legend [" + ", ".join(t.get_text() for t in artist.get_texts()[:4]) + "]"
    return f"text {shorten(artist.get_text(), 60)!r}"


def _px(extent: Any, box: Any) -> str:
    return (f"extent x {extent.x0:.0f}..{extent.x1:.0f}, y {extent.y0:.0f}..{extent.y1:.0f} px; "
            f"figure {box.width:.0f}×{box.height:.0f} px")


def save(fig: Figure, path: Path) -> Path:
    """Draw ``fig`` once at ``DPI``, warn (``LayoutWarning``) about anything that does not fit,
    and write it as a PNG, atomically."""
    fig.set_dpi(DPI)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    for problem in layout_problems(fig, canvas.get_renderer()):
        warnings.warn(LayoutWarning(f"{Path(path).name}: {problem}"), stacklevel=2)
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, np.asarray(canvas.buffer_rgba()), format="png")
    write_bytes_atomic(path, buffer.getvalue())
    return path


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
