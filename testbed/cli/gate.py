"""``testbed gate``: run scenarios, check their ``[expect]`` tables and a committed baseline, and
exit 0 (pass), 1 (a regression) or 2 (a usage or scenario error) — the CI step that fails a build
when a change to a training stack introduces silent inconsistency."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from testbed.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from testbed.engine.preflight import preflight
from testbed.gate import baseline as baselines
from testbed.gate import outputs as gate_report
from testbed.gate.gate import gate, scenario_paths
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
    names = [s.name for s in scenarios]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        print(f"testbed gate: scenario names must be unique (they key the baseline): {', '.join(dupes)}",
              file=sys.stderr)
        return EXIT_USAGE
    for s in scenarios:  # a device or backend this machine lacks: refused before anything runs
        for warning in preflight(s):
            print(f"testbed gate: warning: {s.name}: {warning}", file=sys.stderr)
    try:
        data = baselines.load(args.baseline)
    except baselines.BaselineError as e:
        if not (args.update_baseline and not Path(args.baseline).exists()):
            print(f"testbed gate: {e}", file=sys.stderr)
            return EXIT_USAGE
        data = None
    try:
        out_root = Path(args.out) if args.out else default_run_dir("gate")
    except RunDirError as e:
        print(f"testbed gate: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"testbed gate: {len(scenarios)} scenario(s), baseline {args.baseline}"
          f"{' (updating)' if args.update_baseline else ''}, runs in {out_root}", flush=True)
    outcomes = gate(scenarios, out_root, None if args.update_baseline else data, args.jobs,
                    log=lambda line: print(line, flush=True))
    if args.update_baseline:
        good = {o.name: (_relative(o.scenario.source), o.values) for o in outcomes if o.passed}
        baselines.save(args.baseline, baselines.updated(data, good))
        print(f"baseline {args.baseline}: recorded {len(good)} scenario(s)"
              + ("" if len(good) == len(outcomes) else "; failing scenarios were not recorded"))
    wall = time.monotonic() - started
    print(gate_report.text(outcomes))
    if args.junit:
        gate_report.write_junit(Path(args.junit), outcomes, wall)
    if args.markdown:
        gate_report.write_markdown(Path(args.markdown), outcomes, wall, str(args.baseline))
    passed = sum(o.passed for o in outcomes)
    print(f"gate: {passed} passed, {len(outcomes) - passed} failed")
    return EXIT_OK if passed == len(outcomes) else EXIT_FAILED


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
    p.set_defaults(func=cmd_gate)
