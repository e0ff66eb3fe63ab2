"""``testbed report RUN_DIR|SWEEP_DIR ... [--out DIR]``: figures and one self-contained HTML page.

Inputs (``report/load.py``): run and sweep directories, read through their schemas and streamed,
so a record of any length is drawn from at most ``record.digest.PLOT_POINTS`` rows per run. Writes
PNGs (``testbed.report.figures``), ``report.json`` (the tables) and ``index.html`` with the PNGs embedded
as base64, so the page can be mailed or attached to a CI job as one file. Every file is written
atomically without following a link (a full disk leaves no 0-byte PNG). A new figure is a function
in ``figures.py`` and one line in ``sweep_figures`` / ``run_figures``.
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any, Sequence

from testbed.diagnose.attribution import describe as describe_outlier
from testbed.diagnose.text import verdict_cell
from testbed.diagnose.summary import SUMMARY_METRICS
from testbed.record.files import write_json_atomic
from testbed.record.names import segment
from testbed.record.safeio import write_bytes_atomic
from testbed.report.load import ReportInputError, RunData, SweepData, load_inputs, load_run, load_sweep

__all__ = ["ReportInputError", "RunData", "SweepData", "load_inputs", "load_run", "load_sweep", "write_report",
           "format_level_table", "level_axis", "level_table"]
LEVEL_COLUMNS: tuple[str, ...] = ("loss_cv", "grad_norm_cv", "cos_mean", "pairwise_cos_mean", "noise_scale")


def level_table(sweep: SweepData) -> list[dict[str, Any]]:
    """level → run means of the dispersion metrics (the ladder's headline numbers)."""
    table = []
    for run in sweep.runs:
        entry: dict[str, Any] = {"index": run.level["index"], "label": run.label, "value": run.level.get("value"),
                                 "status": run.status, "steps": run.summary["steps_recorded"]}
        for key in LEVEL_COLUMNS:
            entry[key] = run.summary.get(key, {}).get("mean")
        entry["weights_in_sync"] = run.summary.get("weights_in_sync")
        entry["verdict"] = verdict_cell(run.verdict)
        entry["outlier"] = describe_outlier(run.summary["outlier"]) if "outlier" in run.summary else ""
        table.append(entry)
    return table


def format_level_table(table: Sequence[dict[str, Any]]) -> str:
    """The level table for the terminal (means over each run's recorded steps)."""
    head = f"{'level':<22}{'mean loss CV':>14}{'grad-norm CV':>14}{'mean cosine':>13}{'in sync':>9}  verdict"
    lines = [head]
    for e in table:
        cells = [f"{_num(e.get(k)):>{w}}" for k, w in (("loss_cv", 14), ("grad_norm_cv", 14), ("cos_mean", 13))]
        lines.append(f"{str(e['label'])[:21]:<22}{''.join(cells)}{str(e.get('weights_in_sync')):>9}  "
                     f"{e.get('verdict', '')}")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def _slug(text: str) -> str:
    """A figure file name's stem: one safe, collision-free path segment (``record.names``)."""
    return segment(text or "run")


def level_axis(sweep: SweepData) -> tuple[list[float], list[str], str]:
    """x positions, tick labels and axis label of the levels: numeric values as they are; rank
    lists (a ladder over which ranks are perturbed) by their length; otherwise the level index."""
    values = [run.level.get("value") for run in sweep.runs]
    labels = [run.label for run in sweep.runs]
    name = sweep.parameter or "level"
    sizes = [len(v) for v in values if isinstance(v, list)]
    if len(sizes) == len(values) and len(set(sizes)) == len(sizes):
        return [float(n) for n in sizes], [f"{n}\n({lab})" for n, lab in zip(sizes, labels)], \
            f"number of ranks in {name}"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(set(values)) == len(values):
        return [float(v) for v in values], labels, name
    return [float(run.level["index"]) for run in sweep.runs], labels, f"{name} (level)"


def _figures() -> Any:
    """The plotting module, imported on first use: matplotlib costs every CLI call ~0.3 s."""
    from testbed.report import figures

    return figures


def sweep_figures(sweep: SweepData, out: Path) -> list[Path]:
    if not sweep.runs:
        return []
    figures = _figures()
    name = _slug(sweep.scenario or sweep.sweep_dir.name)
    title = f"{sweep.scenario or sweep.sweep_dir.name}: sweep over {sweep.parameter or 'levels'}"
    panels = [f"{sweep.parameter} = {r.label}" if sweep.parameter else r.label for r in sweep.runs]
    made = [figures.rank_losses(sweep.runs, out / f"{name}_rank_losses.png",
                                f"{title}\nper-rank loss vs the global loss", panel_titles=panels, sharey=True),
            figures.dispersion_vs_step(sweep.runs, out / f"{name}_dispersion_vs_step.png",
                                       f"{title}: dispersion per step", legend_title=sweep.parameter or None)]
    positions, ticks, xlabel = level_axis(sweep)
    made.append(figures.dispersion_vs_level(ticks, positions, sweep.runs, out / f"{name}_dispersion_vs_level.png",
                                            f"{title}: dispersion per level", xlabel))
    heatmap = pairwise_figure(sweep.runs, panels, out / f"{name}_pairwise.png",
                              f"{title}: last pairwise matrix per level")
    return made + ([heatmap] if heatmap else [])


def run_figures(runs: Sequence[RunData], out: Path) -> list[Path]:
    if not runs:
        return []
    figures = _figures()
    labels = [r.label for r in runs]
    made = [figures.rank_losses(runs, out / "runs_rank_losses.png", "per-rank loss vs the global loss"),
            figures.dispersion_vs_step(runs, out / "runs_dispersion_vs_step.png", "dispersion per step")]
    heatmap = pairwise_figure(runs, labels, out / "runs_pairwise.png", "last pairwise cosine matrix per run")
    return made + ([heatmap] if heatmap else [])


def pairwise_figure(runs: Sequence[RunData], panels: Sequence[str], path: Path, title: str) -> Path | None:
    """Heatmaps of each run's last recorded pairwise matrix (runs without one are left out)."""
    items = []
    for run, panel in zip(runs, panels):
        if run.last_pairwise is not None:
            items.append((panel, *run.last_pairwise))
    return _figures().pairwise_heatmaps(items, path, title) if items else None


def summary_html(run: RunData) -> str:
    s = run.summary
    cells = "".join(f"<tr><td>{k}</td><td>{_num(s[k]['final'])}</td><td>{_num(s[k]['peak'])}</td>"
                    f"<td>{_num(s[k]['mean'])}</td></tr>" for k in SUMMARY_METRICS if k in s)
    notes = [f"<b>verdict: {html.escape(str(run.verdict.get('headline', run.verdict.get('status'))))}</b>",
             f"status: {html.escape(run.status)}", f"steps recorded: {s['steps_recorded']}"]
    if "weights_in_sync" in s:
        sync = "yes" if s["weights_in_sync"] else (
            f"NO — first divergence at step {s['first_weight_divergence_step']}, rank(s) "
            f"{s.get('first_weight_divergence_ranks')} differ from {s.get('weight_divergence_reference')}")
        notes.append(f"weights in sync: {html.escape(sync)}")
    if "outlier" in s:
        notes.append(f"outlier: {html.escape(describe_outlier(s['outlier']))}")
    if s.get("flag_count"):
        notes.append(f"flags: {s['flag_count']}")
    if run.sampling.get("plot_stride", 1) > 1:
        v = run.sampling["verdict_input"]
        notes.append(f"{run.sampling['rows']} rows: figures show {run.sampling['plot_points']} points, each the mean "
                     f"of {run.sampling['plot_stride']} steps; summary exact; the verdict uses {v['rows']} rows "
                     f"(every {v['every']}th plus {v['notable']} with flags or a failed weight check) if it was "
                     "not recorded")
    return (f"<h3>{html.escape(run.label)}</h3><p class=path>{html.escape(str(run.run_dir))}</p>"
            f"<ul>{''.join(f'<li>{n}</li>' for n in notes)}</ul>"
            f"<table><tr><th>metric</th><th>final</th><th>peak</th><th>mean</th></tr>{cells}</table>")


def level_html(sweep: SweepData, table: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("#", "level", "value", "status", "steps", *LEVEL_COLUMNS,
                                             "weights in sync", "verdict", "outlier"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
        e["index"], e["label"], e["value"], e["status"], e["steps"],
        *(_num(e[k]) for k in LEVEL_COLUMNS), e["weights_in_sync"], e["verdict"], e["outlier"])) + "</tr>"
        for e in table)
    missing = f"<p>levels without a record: {html.escape(', '.join(sweep.missing))}</p>" if sweep.missing else ""
    return (f"<h2>sweep: {html.escape(sweep.scenario)} over {html.escape(sweep.parameter)}</h2>"
            f"<p class=path>{html.escape(str(sweep.sweep_dir))} (source: {html.escape(sweep.source)}); "
            f"columns are means over each run's recorded steps</p>{missing}<table><tr>{head}</tr>{body}</table>")


def image_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'


STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;"
         "margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}"
         "td:first-child,th:first-child{text-align:left}img{max-width:100%}.path{color:#666;font-size:12px}"
         "figure{margin:1em 0}figcaption{color:#666;font-size:12px}")


def write_report(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """Load, draw, and write ``index.html`` + ``report.json`` under ``out``; returns the tables."""
    sweeps, runs = load_inputs(paths)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportInputError(f"--out {out}: cannot be created ({e.strerror or e})") from None
    sections, record = [], {"sweeps": [], "runs": [], "figures": []}
    for sweep in sweeps:
        table = level_table(sweep)
        pngs = sweep_figures(sweep, out)
        record["sweeps"].append({"sweep_dir": str(sweep.sweep_dir), "scenario": sweep.scenario,
                                 "parameter": sweep.parameter, "levels": table, "missing": sweep.missing})
        record["figures"] += [p.name for p in pngs]
        sections.append(level_html(sweep, table) + "".join(map(image_html, pngs))
                        + "".join(summary_html(r) for r in sweep.runs))
    if runs:
        pngs = run_figures(runs, out)
        record["figures"] += [p.name for p in pngs]
        record["runs"] = [{"label": r.label, "run_dir": str(r.run_dir), "verdict": r.verdict, "summary": r.summary}
                          for r in runs]
        sections.append("<h2>runs</h2>" + "".join(summary_html(r) for r in runs) + "".join(map(image_html, pngs)))
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>testbed report</title><style>{STYLE}</style>"
            f"</head><body><h1>testbed report</h1><p class=path>generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
            f"{html.escape(', '.join(map(str, paths)))}</p>{''.join(sections)}</body></html>\n")
    write_bytes_atomic(out / "index.html", page.encode("utf-8"))
    write_json_atomic(out / "report.json", record)
    return record
