"""``testbed report RUN_DIR|SWEEP_DIR ... [--out DIR]``: figures and one self-contained HTML page.

Inputs are run directories (``metrics.jsonl``, ``run.json``) and sweep directories
(``sweep.json`` = ``{"scenario", "source", "parameter", "levels": [{"index", "label", "value",
"run_dir" (relative to the sweep dir), "status"}]}``, levels taken in ``index`` order). Writes
PNGs (``testbed.report.figures``), ``report.json`` (the tables) and ``index.html`` with the PNGs embedded
as base64, so the page can be mailed or attached to a CI job as one file.
"""
from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from testbed.diagnose.attribution import describe as describe_outlier
from testbed.diagnose.text import verdict_cell
from testbed.diagnose.verdict import verdict_record
from testbed.record.files import METRICS_FILE, RUN_FILE, read_json, read_metrics, write_json_atomic
from testbed.diagnose.summary import SUMMARY_METRICS, summarize

SWEEP_FILE = "sweep.json"
LEVEL_COLUMNS: tuple[str, ...] = ("loss_cv", "grad_norm_cv", "cos_mean", "pairwise_cos_mean", "noise_scale")


@dataclass
class RunData:
    """One run as the report sees it."""

    label: str
    run_dir: Path
    rows: list[dict[str, Any]]
    status: str
    summary: dict[str, Any]
    level: dict[str, Any] | None = None  # its entry in sweep.json, if it is a sweep level
    verdict: dict[str, Any] = field(default_factory=dict)  # run.json["verdict"] (docs/diagnosis.md)


@dataclass
class SweepData:
    sweep_dir: Path
    scenario: str
    parameter: str
    source: str
    runs: list[RunData] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # levels whose run dir has no metrics


def load_run(run_dir: Path, label: str | None = None, level: dict[str, Any] | None = None) -> RunData:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    meta = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).exists() else {}
    name = label or meta.get("scenario", {}).get("name") or meta.get("name") or run_dir.name  # a monitor's: name
    status = (level or {}).get("status") or meta.get("status", "unknown")
    verdict = meta.get("verdict") if isinstance(meta.get("verdict"), dict) else None
    world_size = meta.get("scenario", {}).get("world_size")
    return RunData(name, run_dir, rows, status, summarize(rows), level,
                   verdict or verdict_record(rows, world_size=world_size))


def load_sweep(sweep_dir: Path) -> SweepData:
    meta = read_json(Path(sweep_dir) / SWEEP_FILE)
    sweep = SweepData(Path(sweep_dir), str(meta.get("scenario", "")), str(meta.get("parameter", "")),
                      str(meta.get("source", "")))
    for level in sorted(meta.get("levels", []), key=lambda lv: lv["index"]):
        run_dir = Path(sweep_dir) / level["run_dir"]
        label = str(level.get("label", level["index"]))
        if (run_dir / METRICS_FILE).exists():
            sweep.runs.append(load_run(run_dir, label, level))
        else:
            sweep.missing.append(f"{label} ({level.get('status', 'no record')})")
    return sweep


def load_inputs(paths: Sequence[Path]) -> tuple[list[SweepData], list[RunData]]:
    """Sweep dirs (``sweep.json``) and run dirs (``metrics.jsonl``); anything else is an error."""
    sweeps, runs = [], []
    for p in map(Path, paths):
        if (p / SWEEP_FILE).exists():
            sweeps.append(load_sweep(p))
        elif (p / METRICS_FILE).exists():
            runs.append(load_run(p))
        else:
            raise FileNotFoundError(f"{p}: neither a run directory ({METRICS_FILE}) "
                                    f"nor a sweep directory ({SWEEP_FILE})")
    labels = [r.label for r in runs]
    for r in runs:  # two runs of one scenario: tell them apart by the end of their paths that differs
        same = [o.run_dir for o in runs if labels[runs.index(o)] == labels[runs.index(r)]]
        if len(same) > 1:
            r.label = f"{r.label} ({distinct_suffix(r.run_dir, same)})"
    return sweeps, runs


def distinct_suffix(path: Path, among: Sequence[Path]) -> str:
    """The shortest end of ``path`` that no other path in ``among`` shares (``A/testbed`` for
    ``A/testbed`` among ``B/testbed``); the whole path if none is shorter."""
    parts = Path(path).resolve().parts
    others = [Path(o).resolve().parts for o in among if Path(o).resolve() != Path(path).resolve()]
    for k in range(1, len(parts) + 1):
        if all(o[-k:] != parts[-k:] for o in others):
            return "/".join(parts[-k:])
    return str(path)


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
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60] or "run"


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
        last = next((r for r in reversed(run.rows) if r.get("pairwise_cos")), None)
        if last is not None:
            items.append((panel, last["step"], last["pairwise_cos"]))
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
    out.mkdir(parents=True, exist_ok=True)
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
    (out / "index.html").write_text(page, encoding="utf-8")
    write_json_atomic(out / "report.json", record)
    return record
