"""The page's parts as HTML fragments: a run's card (its one explanation line, its findings, its
numbers), a sweep's level table and ladder table, an embedded figure. Every string that comes from
a record (names, labels, paths, verdict text) is escaped here (``esc``).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

from testbed.diagnose.summary import SUMMARY_METRICS
from testbed.diagnose.text import verdict_cell
from testbed.report.explain import explanation, findings
from testbed.report.ladder import PANELS, Ladder, trend_text
from testbed.report.load import RunData, SweepData

LEVEL_COLUMNS: tuple[str, ...] = ("loss_cv", "grad_norm_cv", "cos_mean", "pairwise_cos_mean", "noise_scale")
STATUS_CLASS = {"consistent": "ok", "inconsistent": "bad", "diverged": "bad"}

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;padding:0 1em}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right;font-size:13px;vertical-align:top}td:first-child,th:first-child{text-align:left}"
         "td.text,th.text{text-align:left}.scroll{overflow-x:auto;max-width:100%}"
         "img{max-width:100%;height:auto}.path{color:#666;font-size:12px;overflow-wrap:anywhere}"
         "figure{margin:1em 0}figcaption{color:#666;font-size:12px;overflow-wrap:anywhere}"
         ".verdict{font-weight:bold;font-size:15px;padding:.4em .6em;border-left:5px solid #888;"
         "overflow-wrap:anywhere}.verdict.ok{border-color:#2e7d32}.verdict.bad{border-color:#c0392b}"
         "section.run{border-top:1px solid #ddd;margin-top:1.5em}.notes{color:#444;font-size:13px}"
         "ul.notes li{overflow-wrap:anywhere}")


def esc(value: Any) -> str:
    return html.escape(str(value))


def num(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def level_table(sweep: SweepData) -> list[dict[str, Any]]:
    """level → run means of the dispersion metrics (the ladder's headline numbers) and the verdict."""
    table = []
    for run in sweep.runs:
        entry: dict[str, Any] = {"index": run.level["index"], "label": run.label, "value": run.level.get("value"),
                                 "status": run.status, "steps": run.summary["steps_recorded"]}
        for key in LEVEL_COLUMNS:
            entry[key] = run.summary.get(key, {}).get("mean")
        entry["weights_in_sync"] = run.summary.get("weights_in_sync")
        entry["verdict"] = verdict_cell(run.verdict)
        entry["since_step"] = run.verdict.get("since_step")
        table.append(entry)
    return table


def format_level_table(table: Sequence[dict[str, Any]]) -> str:
    """The level table for the terminal (means over each run's recorded steps)."""
    head = f"{'level':<22}{'mean loss CV':>14}{'grad-norm CV':>14}{'mean cosine':>13}{'in sync':>9}  verdict"
    lines = [head]
    for e in table:
        cells = [f"{num(e.get(k)):>{w}}" for k, w in (("loss_cv", 14), ("grad_norm_cv", 14), ("cos_mean", 13))]
        since = f" since step {e['since_step']}" if e.get("since_step") is not None else ""
        lines.append(f"{str(e['label'])[:21]:<22}{''.join(cells)}{str(e.get('weights_in_sync')):>9}  "
                     f"{e.get('verdict', '')}{since}")
    return "\n".join(lines)


def level_html(sweep: SweepData, table: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("#", "level", "value", "status", "steps", *LEVEL_COLUMNS,
                                             "weights in sync", "verdict", "since step"))
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in (
        e["index"], e["label"], e["value"], e["status"], e["steps"], *(num(e[k]) for k in LEVEL_COLUMNS),
        e["weights_in_sync"], e["verdict"], "—" if e["since_step"] is None else e["since_step"])) + "</tr>"
        for e in table)
    missing = f"<p>levels without a record: {esc(', '.join(sweep.missing))}</p>" if sweep.missing else ""
    return (f"<h2>sweep: {esc(sweep.scenario)} over {esc(sweep.parameter)}</h2>"
            f"<p class=path>{esc(sweep.sweep_dir)} (source: {esc(sweep.source)}); "
            f"columns are means over each run's recorded steps</p>{missing}"
            f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>")


def ladder_html(ladder: Ladder) -> str:
    """The ladder's numbers: per level and metric the paired difference from level 0 [95 % CI], p;
    the trend test per metric in the last row."""
    head = "".join(f"<th>{esc(label)}: difference [95 % CI], p</th>" for _, label in PANELS)
    rows = []
    for k, level in enumerate(ladder.labels):
        cells = []
        for metric, _ in PANELS:
            paired = (ladder.paired.get(metric) or [None] * len(ladder.labels))[k]
            if k == 0:
                cells.append("reference")
            elif paired is None:
                cells.append("—")
            else:
                ci = "" if paired.ci is None else f" [{paired.ci[0]:+.3g}, {paired.ci[1]:+.3g}]"
                p = "" if paired.p_value is None else f", p = {paired.p_value:.2g}"
                cells.append(f"{paired.mean:+.3g}{ci}{p}")
        rows.append(f"<tr><td>{esc(level)}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    trend = "".join(f"<td>{esc(trend_text(m, ladder.trend.get(m)))}</td>" for m, _ in PANELS)
    return (f"<p class=notes>Each level against level 0 ({esc(ladder.against)}), paired per step (comparison "
            f"{esc(ladder.source)}):</p><div class=scroll><table><tr><th>level</th>{head}</tr>{''.join(rows)}"
            f"<tr><td>trend over levels</td>{trend}</tr></table></div>")


def findings_html(verdict: dict[str, Any]) -> str:
    found = findings(verdict)
    if not found:
        return ""
    head = "<tr><th>#</th><th class=text>who</th><th class=text>finding</th><th class=text>how sure</th></tr>"
    body = "".join(f"<tr><td>{f.number}</td><td class=text>{esc(f.subject)}</td><td class=text>{esc(f.text)}"
                   f"{'' if f.counts else ' (not counted)'}</td><td class=text>{esc(f.certainty)}</td></tr>"
                   for f in found)
    return f"<div class=scroll><table class=findings>{head}{body}</table></div>"


def run_card(run: RunData, evidence_png: Path | None) -> str:
    """A run: its one explanation line (the verdict), the findings, the figure of where they are,
    then the run's facts and its metrics' final / peak / mean."""
    s, v = run.summary, run.verdict
    status = str(v.get("status", "unknown"))
    facts = [f"run status: {esc(run.status)}", f"steps recorded: {s['steps_recorded']}"]
    if "weights_in_sync" in s:
        sync = "yes" if s["weights_in_sync"] else (
            f"NO — first divergence at step {s['first_weight_divergence_step']}, rank(s) "
            f"{s.get('first_weight_divergence_ranks')} differ from {s.get('weight_divergence_reference')}")
        facts.append(f"weights in sync: {esc(sync)}")
    if s.get("flag_count"):
        facts.append(f"flags: {s['flag_count']}")
    if run.sampling.get("plot_stride", 1) > 1:
        vi = run.sampling["verdict_input"]
        facts.append(f"{run.sampling['rows']} rows: figures show {run.sampling['plot_points']} points, each the mean "
                     f"of {run.sampling['plot_stride']} steps; summary exact; the verdict uses {vi['rows']} rows "
                     f"(every {vi['every']}th plus {vi['notable']} with flags or a failed weight check) if it was "
                     "not recorded")
    notes = [n for n in v.get("notes") or [] if isinstance(n, str)]
    cells = "".join(f"<tr><td>{k}</td><td>{num(s[k]['final'])}</td><td>{num(s[k]['peak'])}</td>"
                    f"<td>{num(s[k]['mean'])}</td></tr>" for k in SUMMARY_METRICS if k in s)
    return (f"<section class=run><h3>{esc(run.label)}</h3><p class=path>{esc(run.run_dir)}</p>"
            f"<p class='verdict {STATUS_CLASS.get(status, '')}'>{esc(explanation(v))}</p>"
            + findings_html(v)
            + (f"<ul class=notes>{''.join(f'<li>{esc(n)}</li>' for n in notes)}</ul>" if notes else "")
            + (image_html(evidence_png) if evidence_png else "")
            + f"<p class=notes>{' · '.join(facts)}</p>"
            f"<table><tr><th>metric</th><th>final</th><th>peak</th><th>mean</th></tr>{cells}</table></section>")


def image_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = esc(path.name)
    return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'
