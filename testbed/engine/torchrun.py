"""Entry point for torchrun: ``torchrun --nproc-per-node N -m testbed.worker SCENARIO --out DIR``.

torchrun starts the processes and passes the layout through RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; the worker joins with ``init_method="env://"``. This module adds what
the spawn launcher would otherwise do: rank 0 writes ``run.json`` (status ``running``, then ``ok``
or ``failed`` with the root-cause rank, step and traceback), every failing rank writes
``ranks/rankR.json``, and ``@record`` puts the traceback into torchrun's ChildFailedError summary.

When one rank fails, torchrun sends SIGTERM to the others. Rank 0 turns that signal into an
exception so that it still finishes ``run.json``, naming the rank whose report is the root cause
(a report that only says a peer went away is secondary, as in the spawn launcher). Reports of
ranks on other nodes are only seen if ``--out`` is on a filesystem shared by the nodes.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from testbed.scenario.spec import Scenario, ScenarioError, load_scenario

GRACE_S = 5.0  # how long rank 0 waits for a root-cause report after its own failure
LAYOUT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Terminated(RuntimeError):
    """torchrun (or a user) sent SIGTERM: usually because another rank failed."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun ... -m testbed.worker",
                                     description="One rank of a testbed scenario under torchrun.")
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--out", required=True, help="run directory (the same path on every rank)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any field")
    return parser


def layout_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, or a clear error."""
    missing = [v for v in LAYOUT_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {', '.join(missing)} are not set: start this entry point with "
                           "torchrun (or testbed run --launcher torchrun), not directly")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


@record
def main(argv: Sequence[str] | None = None) -> int:
    from testbed.scenario.overrides import parse_overrides

    args = build_parser().parse_args(argv)
    rank, world_size, local_rank = layout_from_env()
    try:
        scenario = load_scenario(args.scenario, parse_overrides(args.set, steps=args.steps, world_size=args.world_size))
    except ScenarioError as e:
        print(f"testbed: scenario error: {e}", file=sys.stderr)
        return 2
    if scenario.world_size != world_size:
        raise RuntimeError(f"{args.scenario}: world_size = {scenario.world_size} but torchrun started {world_size} "
                           f"processes; pass --world-size {world_size} (or make nnodes × nproc-per-node match)")
    return run_rank(scenario, Path(args.out), rank, world_size, local_rank)


def run_rank(scenario: Scenario, out_dir: Path, rank: int, world_size: int, local_rank: int) -> int:
    """Train this rank; rank 0 keeps run.json current. Re-raises a failure (for @record)."""
    from testbed.engine import worker
    from testbed.engine.runner import RunResult, _remove_stale_record, finish_record, start_record

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run = None
    if rank == 0:  # before the process group exists, so no peer can have reported yet
        _remove_stale_record(out_dir)
        run = start_record(scenario, out_dir, scenario.backend, "torchrun")
    ctx = worker.RankContext(rank, world_size, local_rank, out_dir)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        worker.train(scenario, ctx)
    except BaseException as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the record even if torchrun insists
        worker.write_error_report(ctx, exc)
        sys.stderr.write(f"[testbed] rank {rank} failed at step {ctx.step}: {type(exc).__name__}: {exc}\n")
        if run is not None:
            result = failure_result(out_dir, worker.error_report(ctx, exc))
            result.wall_time_s = time.monotonic() - started
            finish_record(out_dir, run, result)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if run is not None:
        finish_record(out_dir, run, RunResult("ok", wall_time_s=time.monotonic() - started))
    return 0


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("SIGTERM received (torchrun stops every rank when one fails)")


def _is_secondary(report: dict[str, Any]) -> bool:
    from testbed.engine.runner import _is_secondary as peer_went_away

    return peer_went_away(report) or report.get("error", "").startswith(Terminated.__name__)


def failure_result(out_dir: Path, own: dict[str, Any]) -> Any:
    """The root cause among the rank reports (waiting up to GRACE_S for one), else rank 0's own."""
    from testbed.engine.runner import RunResult, _rank_reports

    deadline = time.monotonic() + GRACE_S
    while True:
        reports = _rank_reports(out_dir)
        primary = sorted((r for r in reports if not _is_secondary(r)), key=lambda r: r.get("time", 0.0))
        if primary or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    root = primary[0] if primary else own
    reason = f"rank {root['rank']} failed at step {root['step']}: {root['error']}"
    return RunResult("failed", reason, root["rank"], root["step"], root.get("traceback"),
                     rank_reports=reports)


if __name__ == "__main__":
    sys.exit(main())
