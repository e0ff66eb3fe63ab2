"""``testbed sweep SCENARIO``: every level of a ``[sweep]`` (a desync ladder), resumable."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from testbed.cli.common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_override_arguments, add_progress_arguments,
                                overrides_of)
from testbed.engine.control import sweep_comparison
from testbed.engine.signals import StopOnSignals
from testbed.engine.sweep import results_table, run_sweep
from testbed.record.files import RunDirError
from testbed.scenario import catalog
from testbed.scenario.sweep import SWEEP_FILE, select_levels


def cmd_sweep(args: argparse.Namespace) -> int:
    """Exit 0 (every selected level ok), 1 (a level failed, or the record could not be written),
    2 (a bad scenario or --out), 128 + N on signal N (the running level's record is finalized,
    sweep.json marks it pending: rerun to resume)."""
    started = time.monotonic()
    try:
        with StopOnSignals():  # SIGTERM / SIGHUP between levels too, not only inside a launcher
            out_dir, levels, status = run_sweep(catalog.resolve(args.scenario), Path(args.out) if args.out else None,
                                                overrides_of(args), args.levels, every_s=args.progress_every,
                                                progress=not args.no_progress, overwrite=args.overwrite)
    except RunDirError as e:  # --out unusable, in use, holding another record; a foreign level directory
        print(f"testbed sweep: --out {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a full disk while writing sweep.json
        print(f"testbed sweep: cannot write the sweep record ({e.strerror or e}); levels finished so far are "
              "kept: rerun to resume", file=sys.stderr)
        return EXIT_FAILED
    selected = select_levels(levels, args.levels, str(args.scenario))
    print(results_table(out_dir, levels, status))
    print(sweep_comparison(out_dir, levels))
    ok = all(status[lv.index] == "ok" for lv in selected)
    print(f"{'ok' if ok else 'FAILED'}: {sum(status[lv.index] == 'ok' for lv in selected)}/{len(selected)} "
          f"level(s) ok in {time.monotonic() - started:.1f} s; record: {out_dir}/{SWEEP_FILE}")
    return EXIT_OK if ok else EXIT_FAILED


def add_subcommand(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="run a scenario at every level of its [sweep] (a desync ladder)")
    p.add_argument("scenario", help="scenario file with a [sweep] table, or its catalog name (e.g. seed_ladder)")
    p.add_argument("--out", help="sweep directory (default: runs/<name>-sweep-<timestamp>); reuse it to resume")
    p.add_argument("--levels", nargs="+", metavar="LEVEL",
                   help="run only these levels (labels, or indices where no label matches)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the record --out holds (a run, another sweep) instead of refusing it")
    add_override_arguments(p, "override a field of every level")
    add_progress_arguments(p)
    p.set_defaults(func=cmd_sweep)
