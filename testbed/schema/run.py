"""``run.json``: the keys of a run record, as the runner and the drop-in monitor write them.

A record starts with ``status = "running"`` and is finalized, however the run ends, with the
status, the reason, the steps kept, the wall time and the verdict over the rows
(``engine/finalize.py``). A scenario run also holds ``scenario``; a monitored user loop holds
``name``, ``world_size``, ``cadence``, ``client`` and ``ranks`` (every rank's environment) instead.
"""
from __future__ import annotations

STATUS = "status"
RUNNING, OK, FAILED = "running", "ok", "failed"  # values of STATUS
REASON = "reason"
VERDICT = "verdict"
STEPS_KEPT = "steps_kept"
WALL_TIME_S = "wall_time_s"
STARTED_AT = "started_at"
FAILED_RANK = "failed_rank"
FAILED_STEP = "failed_step"
TRACEBACK = "traceback"
RANK_REPORTS = "rank_reports"
SCENARIO = "scenario"
ENVIRONMENT = "environment"  # rank 0's (the runner: the launcher's)
LAUNCHER = "launcher"  # "spawn" | "torchrun" (the runner); {"kind", "env"} (the monitor: what started the ranks)
NAME = "name"
WORLD_SIZE = "world_size"
CADENCE = "cadence"  # which steps are measured / pairwise / state-checked (scenario/cadence.py)
CLIENT = "client"  # the monitor's caller: "attach" | "hf_trainer" | "lightning"
RANKS = "ranks"  # the monitor: every rank's environment (host, pid, local rank, device)
ALPHA = "alpha"  # the monitor: false-alarm rate of its online test (None: off)
INTENDED = "intended"  # exact data causes the run declares on purpose ("replicated", "epoch_repeat"): not counted
DATA_CAUSES = ("replicated", "overlap", "epoch_repeat", "uncovered")  # the data ledger's causes (diagnose/data.py)
LEDGER_SAMPLES = "ledger_samples"  # the monitor: the data ledger's sampled fingerprints per rank per step (0: off)
