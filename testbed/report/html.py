"""``testbed report RUN_DIR|SWEEP_DIR ... [--out DIR]``: figures and one self-contained HTML page.

Inputs (``report/load.py``): run and sweep directories (a monitor's record too: its run.json has
``world_size`` and ``name`` at the top), read through their schemas and streamed, so a record of any
length is drawn from at most ``record.digest.PLOT_POINTS`` rows per run. Writes PNGs, ``report.json``
(the tables) and ``index.html`` with the PNGs embedded as base64, so the page can be mailed or
attached to a CI job as one file. Every file is written atomically without following a link (a full
disk leaves no 0-byte PNG).

What the page shows (``docs/report.md``): per run, one explanation line (the verdict) and its
findings, and the evidence figure (``evidence_figure.py``); per sweep, the level table, the ladder
with paired 95 % CIs and the trend test (``ladder.py``), and the per-step figures (``figures.py``).
A new figure is a function in its family's module and one line in ``sweep_figures`` /
``run_figures``; the page's fragments are ``sections.py``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from testbed.record.files import write_json_atomic
from testbed.record.names import segment
from testbed.record.safeio import write_bytes_atomic
from testbed.report.ladder import ladder_of, level_axis
from testbed.report.load import ReportInputError, RunData, SweepData, load_inputs, load_run, load_sweep
from testbed.report.sections import (LEVEL_COLUMNS, STYLE, esc, format_level_table, image_html, ladder_html,
                                     level_html, level_table, run_card)

__all__ = ["ReportInputError", "RunData", "SweepData", "load_inputs", "load_run", "load_sweep", "write_report",
           "format_level_table", "level_axis", "level_table", "LEVEL_COLUMNS"]
EVIDENCE_FIGURES_PER_SWEEP = 8  # levels whose verdict is not consistent get one, up to this many


def _slug(text: str) -> str:
    """A figure file name's stem: one safe, collision-free path segment (``record.names``)."""
    return segment(text or "run")


def _modules() -> Any:
    """The plotting modules, imported on first use: matplotlib costs every CLI call ~0.3 s."""
    from testbed.report import deviations, evidence_figure, explain, figures, ladder

    return figures, evidence_figure, deviations, explain, ladder


def evidence_png(run: RunData, path: Path) -> Path | None:
    """The run's evidence figure (None when it has no two ranks to compare)."""
    _, evidence, deviations, explain, _ = _modules()
    maps = deviations.deviation_maps(run.rows, run.world_size)
    return evidence.evidence_figure(run.label, run.verdict, maps, explain.findings(run.verdict), path)


def sweep_figures(sweep: SweepData, out: Path, paired: Any = None) -> tuple[list[Path], dict[int, Path]]:
    """The sweep's figures (the ladder first, from ``paired``: ``ladder.ladder_of``), and the evidence
    figure of each level (by position) whose verdict is not consistent."""
    if not sweep.runs:
        return [], {}
    figures, *_, ladder = _modules()
    name = _slug(sweep.scenario or sweep.sweep_dir.name)
    title = f"{sweep.scenario or sweep.sweep_dir.name}: sweep over {sweep.parameter or 'levels'}"
    panels = [f"{sweep.parameter} = {r.label}" if sweep.parameter else r.label for r in sweep.runs]
    made = []
    if paired is not None:
        positions, ticks, xlabel = level_axis(sweep)
        made.append(ladder.ladder_figure(paired, positions, ticks, xlabel, out / f"{name}_ladder.png", title))
    made += [figures.rank_losses(sweep.runs, out / f"{name}_rank_losses.png",
                                 f"{title}\nper-rank loss vs the global loss", panel_titles=panels, sharey=True),
             figures.dispersion_vs_step(sweep.runs, out / f"{name}_dispersion_vs_step.png",
                                        f"{title}: dispersion per step", legend_title=sweep.parameter or None)]
    heatmap = pairwise_figure(sweep.runs, panels, out / f"{name}_pairwise.png",
                              f"{title}: last pairwise matrix per level")
    made += [heatmap] if heatmap else []
    per_level: dict[int, Path] = {}
    flagged = [k for k, r in enumerate(sweep.runs) if r.verdict.get("status") in ("inconsistent", "diverged")]
    for k in flagged[:EVIDENCE_FIGURES_PER_SWEEP]:
        png = evidence_png(sweep.runs[k], out / f"{name}_{_slug(sweep.runs[k].label)}_evidence.png")
        if png is not None:
            per_level[k] = png
    return made, per_level


def run_figures(runs: Sequence[RunData], out: Path) -> tuple[list[Path], dict[int, Path]]:
    """The figures of the runs given one by one, and each run's evidence figure (by position)."""
    if not runs:
        return [], {}
    figures, *_ = _modules()
    per_run: dict[int, Path] = {}
    for k, run in enumerate(runs):
        stem = _slug(run.label) if len(runs) == 1 else f"run{k + 1:02d}_{_slug(run.label)}"
        png = evidence_png(run, out / f"{stem}_evidence.png")
        if png is not None:
            per_run[k] = png
    labels = [r.label for r in runs]
    made = [figures.rank_losses(runs, out / "runs_rank_losses.png", "per-rank loss vs the global loss"),
            figures.dispersion_vs_step(runs, out / "runs_dispersion_vs_step.png", "dispersion per step")]
    heatmap = pairwise_figure(runs, labels, out / "runs_pairwise.png", "last pairwise cosine matrix per run")
    return made + ([heatmap] if heatmap else []), per_run


def pairwise_figure(runs: Sequence[RunData], panels: Sequence[str], path: Path, title: str) -> Path | None:
    """Heatmaps of each run's last recorded pairwise matrix (runs without one are left out)."""
    items = [(panel, *run.last_pairwise) for run, panel in zip(runs, panels) if run.last_pairwise is not None]
    return _modules()[0].pairwise_heatmaps(items, path, title) if items else None


def _sweep_section(sweep: SweepData, out: Path, record: dict[str, Any]) -> str:
    table = level_table(sweep)
    paired = ladder_of(sweep)
    pngs, per_level = sweep_figures(sweep, out, paired)
    record["sweeps"].append({"sweep_dir": str(sweep.sweep_dir), "scenario": sweep.scenario,
                             "parameter": sweep.parameter, "levels": table, "missing": sweep.missing})
    record["figures"] += [p.name for p in pngs] + [p.name for p in per_level.values()]
    ladder_part = "".join(image_html(p) for p in pngs[:1] if p.name.endswith("_ladder.png"))
    rest = [p for p in pngs if not p.name.endswith("_ladder.png")]
    return ("<section class=sweep>" + level_html(sweep, table) + ladder_part
            + (ladder_html(paired) if paired is not None else "") + "".join(map(image_html, rest))
            + "".join(run_card(r, per_level.get(k)) for k, r in enumerate(sweep.runs)) + "</section>")


def write_report(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """Load, draw, and write ``index.html`` + ``report.json`` under ``out``; returns the tables."""
    sweeps, runs = load_inputs(paths)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportInputError(f"--out {out}: cannot be created ({e.strerror or e})") from None
    sections: list[str] = []
    record: dict[str, Any] = {"sweeps": [], "runs": [], "figures": []}
    for sweep in sweeps:
        sections.append(_sweep_section(sweep, out, record))
    if runs:
        pngs, per_run = run_figures(runs, out)
        record["figures"] += [p.name for p in per_run.values()] + [p.name for p in pngs]
        record["runs"] = [{"label": r.label, "run_dir": str(r.run_dir), "verdict": r.verdict, "summary": r.summary}
                          for r in runs]
        sections.append("<section class=runs><h2>runs</h2>" + "".join(run_card(r, per_run.get(k))
                                                                        for k, r in enumerate(runs))
                        + "".join(map(image_html, pngs)) + "</section>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            f"<title>testbed report</title><style>{STYLE}</style></head><body><h1>testbed report</h1>"
            f"<p class=path>generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
            f"{esc(', '.join(map(str, paths)))}</p>{''.join(sections)}</body></html>\n")
    write_bytes_atomic(out / "index.html", page.encode("utf-8"))
    write_json_atomic(out / "report.json", record)
    return record
