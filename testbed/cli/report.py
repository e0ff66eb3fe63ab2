"""``testbed report RUN_DIR|SWEEP_DIR ... [--out DIR]``: figures and one self-contained HTML page."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from testbed.cli.common import EXIT_FAILED, EXIT_USAGE
from testbed.record.files import RunDirError
from testbed.report.explain import explanation
from testbed.report.html import ReportInputError, format_level_table, write_report


def cmd_report(args: argparse.Namespace) -> int:
    """Exit 0, 2 (an input that is no record, or a malformed one: one line naming the file and the
    field) or 1 (an output that could not be written: a full disk, a planted link)."""
    paths = [Path(p) for p in args.paths]
    out = Path(args.out) if args.out else paths[0] / "report"
    try:
        record = write_report(paths, out)
    except ReportInputError as e:
        print(f"testbed report: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, RunDirError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = getattr(e, "filename", None) or out
        print(f"testbed report: cannot write {where}: {why}", file=sys.stderr)
        return EXIT_FAILED
    for sweep in record["sweeps"]:
        print(f"sweep {sweep['scenario']} over {sweep['parameter']} (means over recorded steps):")
        print(format_level_table(sweep["levels"]))
    for run in record["runs"]:
        print(f"{run['label']}: {explanation(run['verdict'])}")
    print(f"report: {out / 'index.html'} ({len(record['figures'])} figures: {', '.join(record['figures'])})")
    return 0


def add_subcommand(subparsers: Any) -> None:
    parser = subparsers.add_parser("report", help="figures + a self-contained HTML page from run / sweep directories")
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("--out", help="output directory (default: FIRST_PATH/report)")
    parser.set_defaults(func=cmd_report)
