"""The gate's three reports of one set of outcomes: a terminal table, JUnit XML, markdown.

All three say the same thing — per scenario pass/fail, then each failure with what was checked,
by how much it missed, and the step / rank / sweep level where that is known — so a reader of a CI
log, of a test dashboard or of a pull-request comment needs nothing else to act on it.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

from testbed.gate.outcome import Failure, Outcome
from testbed.record.safeio import write_bytes_atomic
from testbed.schema.records import printable

HEADLINE = (("loss_cv.mean", "loss_cv"), ("grad_norm_cv.mean", "grad_norm_cv"), ("cos_mean.mean", "cos_mean"))


def _where(f: "Failure") -> tuple[str, str, str]:
    fmt = (lambda x: "-" if x is None else str(x))
    return fmt(f.level), fmt(f.step), fmt(f.rank)


def _headline(o: "Outcome") -> list[str]:
    out = []
    for key, _ in HEADLINE:
        v = o.values.get(key)
        out.append(f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-")
    sync = o.values.get("weights_in_sync")
    out.append("-" if sync is None else str(sync))
    return out


def text(outcomes: Sequence["Outcome"]) -> str:
    """Scenario table, then (if any) the table of what failed."""
    w = max([len("scenario")] + [len(o.name) for o in outcomes]) + 2
    lines = [f"{'scenario':<{w}}{'result':<8}{'loss_cv':>10}{'grad_cv':>10}{'cos_mean':>10}{'in_sync':>9}"
             f"{'time_s':>8}  run"]
    for o in outcomes:
        lcv, gcv, cos, sync = _headline(o)
        lines.append(f"{o.name:<{w}}{'PASS' if o.passed else 'FAIL':<8}{lcv:>10}{gcv:>10}{cos:>10}{sync:>9}"
                     f"{o.wall_s:>8.1f}  {o.run_dir}")
    failed = [(o, f) for o in outcomes for f in o.failures]
    if failed:
        cw = max(len(f.check) for _, f in failed) + 2
        aw = max([len("by how much")] + [len(f.amount) for _, f in failed]) + 2
        lw = max([len("level")] + [len(f.level or "") for _, f in failed]) + 2
        lines += ["", "What failed (values are means over steps after the warm-up unless the check says otherwise):",
                  f"{'scenario':<{w}}{'check':<{cw}}{'level':>{lw}}{'step':>6}{'rank':>6}  {'by how much':<{aw}}detail"]
        for o, f in failed:
            level, step, rank = _where(f)
            lines.append(f"{o.name:<{w}}{f.check:<{cw}}{level:>{lw}}{step:>6}{rank:>6}  {f.amount or '-':<{aw}}"
                         f"{f.message}")
    return "\n".join(lines)


def junit_tree(outcomes: Sequence["Outcome"], wall_s: float) -> ET.ElementTree:
    """``<testsuites><testsuite name="testbed.gate"><testcase name=SCENARIO>`` with a ``<failure>`` each.

    Only attributes of the strict (xunit2 / Jenkins) schema, so every JUnit consumer accepts it;
    the scenario file and run directory go to ``<system-out>``.
    """
    failures = sum(not o.passed for o in outcomes)
    root = ET.Element("testsuites", name="testbed gate", tests=str(len(outcomes)), failures=str(failures),
                      errors="0", time=f"{wall_s:.3f}")
    suite = ET.SubElement(root, "testsuite", name="testbed.gate", tests=str(len(outcomes)), failures=str(failures),
                          errors="0", skipped="0", time=f"{sum(o.wall_s for o in outcomes):.3f}")
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", classname="testbed.gate", name=printable(o.name),
                             time=f"{o.wall_s:.3f}")
        if o.failures:
            first = o.failures[0]
            message = f"{len(o.failures)} check(s) failed; first: {first.check}: {first.message}"
            body = "\n".join(_failure_line(f) for f in o.failures)
            ET.SubElement(case, "failure", message=printable(message),
                          type="ConsistencyRegression").text = _xml_text(body)
        passed = [f"{f.check}: {f.message}" for f in o.findings if f.passed]
        passed += [f"baseline {d.message}" for d in o.deviations if d.passed and d.message]
        header = f"scenario: {o.scenario.source}\nrun: {o.run_dir}\n"
        ET.SubElement(case, "system-out").text = _xml_text(header + "\n".join(passed))
    ET.indent(root)
    return ET.ElementTree(root)


def _xml_text(text: str) -> str:
    """Multi-line text XML 1.0 can hold: control characters but newline and tab shown escaped."""
    return "\n".join(printable(line.replace("\t", " ")) for line in text.split("\n"))


def _failure_line(f: "Failure") -> str:
    level, step, rank = _where(f)
    where = ", ".join(f"{k} {v}" for k, v in (("level", level), ("step", step), ("rank", rank)) if v != "-")
    return f"{f.check}: {f.message}" + (f" [{f.amount}]" if f.amount else "") + (f" ({where})" if where else "")


def write_junit(path: Path, outcomes: Sequence["Outcome"], wall_s: float) -> None:
    """Written atomically (a reader never sees half a file; a full disk leaves the old one)."""
    import io

    buffer = io.BytesIO()
    junit_tree(outcomes, wall_s).write(buffer, encoding="utf-8", xml_declaration=True)
    write_bytes_atomic(path, buffer.getvalue())


def markdown(outcomes: Sequence["Outcome"], wall_s: float, baseline: str) -> str:
    passed = sum(o.passed for o in outcomes)
    verdict = "PASSED" if passed == len(outcomes) else "FAILED"
    lines = [f"## testbed gate: {verdict} — {passed} passed, {len(outcomes) - passed} failed",
             "", f"Baseline `{baseline}`; {wall_s:.1f} s.", "",
             "| scenario | result | loss_cv | grad_norm_cv | cos_mean | weights in sync | time (s) |",
             "|---|---|---:|---:|---:|---|---:|"]
    for o in outcomes:
        cells = " | ".join(_headline(o))
        lines.append(f"| `{_md(o.name)}` | {'pass' if o.passed else '**FAIL**'} | {cells} | {o.wall_s:.1f} |")
    failed = [(o, f) for o in outcomes for f in o.failures]
    if failed:
        lines += ["", "### What failed", "", "| scenario | check | by how much | level | step | rank | detail |",
                  "|---|---|---|---|---:|---:|---|"]
        for o, f in failed:
            level, step, rank = _where(f)
            lines.append(f"| `{_md(o.name)}` | `{_md(f.check)}` | {_md(f.amount or '-')} | {level} | {step} | {rank} | "
                         f"{_md(f.message)} |")
    lines += ["", "Metric columns: mean over measured steps after the warm-up (`warmup_steps`)."]
    return "\n".join(lines) + "\n"


def _md(text: Any) -> str:
    return printable(str(text).replace("\n", " ")).replace("|", "\\|").replace("`", "'")


def write_markdown(path: Path, outcomes: Sequence["Outcome"], wall_s: float, baseline: str) -> None:
    write_bytes_atomic(path, markdown(outcomes, wall_s, baseline).encode("utf-8"))
