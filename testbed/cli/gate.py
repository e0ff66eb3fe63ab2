"""``testbed gate``: run scenarios, check their ``[expect]`` tables and a committed baseline, and
exit 0 (pass), 1 (a regression) or 2 (a usage or scenario error) — the CI step that fails a build
when a change to a training stack introduces silent inconsistency."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from testbed.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from testbed.engine.preflight import preflight
from testbed.engine.signals import exit_code
from testbed.gate import baseline as baselines
from testbed.gate import outputs as gate_report
from testbed.gate.gate import gate, scenario_paths, slug
from testbed.record.files import RunDirError, default_run_dir
from testbed.scenario.spec import load_scenario


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def cmd_gate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.jobs < 1:
        print("testbed gate: --jobs must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    paths = scenario_paths(args.scenarios)
    if not paths:
        print(f"testbed gate: no scenario files in {', '.join(map(str, args.scenarios))}", file=sys.stderr)
        return EXIT_USAGE
    scenarios = [load_scenario(p) for p in paths]  # a ScenarioError → exit 2 (cli.main)
    problem = _name_problem([s.name for s in scenarios])
    if problem:
        print(f"testbed gate: {problem}", file=sys.stderr)
        return EXIT_USAGE
    for s in scenarios:  # a device, backend or size this machine lacks: refused before anything runs
        for warning in preflight(s):
            print(f"testbed gate: warning: {s.name}: {warning}", file=sys.stderr)
    try:
        data = baselines.load(args.baseline)
    except baselines.BaselineError as e:
        if not (args.update_baseline and not Path(args.baseline).exists()):
            print(f"testbed gate: {e}", file=sys.stderr)
            return EXIT_USAGE
        data = None
    for option, path in (("--junit", args.junit), ("--markdown", args.markdown),
                         ("--baseline", args.baseline if args.update_baseline else None)):
        if path and (why := writable_problem(Path(path))):  # found now, not after the scenarios ran
            print(f"testbed gate: {option} {path}: {why}", file=sys.stderr)
            return EXIT_USAGE
    out_root = Path(args.out) if args.out else default_run_dir("gate")  # RunDirError → exit 2 (cli.main)
    print(f"testbed gate: {len(scenarios)} scenario(s), baseline {args.baseline}"
          f"{' (updating)' if args.update_baseline else ''}, runs in {out_root}", flush=True)
    try:
        outcomes = gate(scenarios, out_root, None if args.update_baseline else data, args.jobs,
                        log=lambda line: print(line, flush=True), overwrite=args.overwrite)
    except RunDirError as e:
        print(f"testbed gate: --out {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"testbed gate: stopped by {getattr(e, 'signame', 'SIGINT')}: the scenarios in flight were stopped "
              f"and their records finalized ({out_root}/gate.json status 'stopped'); nothing was judged",
              file=sys.stderr)
        return exit_code(e)
    return _report(args, outcomes, data, time.monotonic() - started)


def _report(args: argparse.Namespace, outcomes: list[Any], data: Any, wall: float) -> int:
    if args.update_baseline:
        good = {o.name: (_relative(o.scenario.source), o.values) for o in outcomes if o.passed}
        baselines.save(Path(args.baseline).resolve(), baselines.updated(data, good))  # a user's link: its target
        print(f"baseline {args.baseline}: recorded {len(good)} scenario(s)"
              + ("" if len(good) == len(outcomes) else "; failing scenarios were not recorded"))
    print(gate_report.text(outcomes))
    try:
        # files the user named, outside any record: a link the user made there is followed to its target
        if args.junit:
            gate_report.write_junit(Path(args.junit).resolve(), outcomes, wall)
        if args.markdown:
            gate_report.write_markdown(Path(args.markdown).resolve(), outcomes, wall, str(args.baseline))
    except (OSError, RunDirError) as e:  # checked before the run; a disk can still fill up
        print(f"testbed gate: could not write a report file: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_FAILED
    passed = sum(o.passed for o in outcomes)
    print(f"gate: {passed} passed, {len(outcomes) - passed} failed")
    return EXIT_OK if passed == len(outcomes) else EXIT_FAILED


def _name_problem(names: list[str]) -> str:
    """Names key the baseline and name directories: unique, also as directory names on a
    case-insensitive filesystem (``record.names.segment`` is injective, case aside)."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        return f"scenario names must be unique (they key the baseline): {', '.join(map(repr, dupes))}"
    folded = [slug(n).casefold() for n in names]
    clash = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
    if clash:
        return f"scenario names must differ in more than letter case (they name directories): {', '.join(map(repr, clash))}"
    return ""


def writable_problem(path: Path) -> str:
    """Why a file cannot be written at ``path`` ("" if it can): tried for real in its directory."""
    if path.is_dir():
        return "is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.{os.getpid()}.probe"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        return f"cannot be written ({e.strerror or e})"
    return ""


def add_subcommand(subparsers: Any) -> None:
    p = subparsers.add_parser("gate", help="CI gate: run scenarios, check [expect] and a baseline; exit 1 on "
                              "a regression")
    p.add_argument("scenarios", nargs="*", help="scenario files or directories (default: scenarios/)")
    p.add_argument("--baseline", required=True, help="baseline JSON (committed; see docs/writing-scenarios.md)")
    p.add_argument("--update-baseline", action="store_true",
                   help="record this run's values for the passing scenarios (keeps the file's tolerances)")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML (one testcase per scenario)")
    p.add_argument("--markdown", metavar="FILE", help="write a markdown summary (for CI logs)")
    p.add_argument("--out", metavar="DIR", help="run directory root (default: runs/gate-<timestamp>)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="scenarios run at once (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out replace a run or sweep record it holds (an earlier gate's --out is re-used)")
    p.set_defaults(func=cmd_gate)
