"""The run record of a monitored user loop: owned like a runner's, started at ``attach``, finalized
at every ending, with the same verdict.

``attach(model, out_dir=...)``: rank 0 takes the runner's run-dir lock (``record/rundir.py``). A
directory holding a live or finished record is refused - unless ``overwrite=True``, which removes
that record first - and rank 0's decision reaches every rank through the job's store, so every
rank raises the same one-line ``RunDirError`` before training starts and no two runs ever mix.
Rank 0 then writes ``run.json`` with status ``running``: the name, the client, how the ranks were
launched, every rank's environment, the cadence, the world size.

``finish`` (``Monitor.close``, interpreter exit, a stop signal, an exception escaping the loop)
writes the final ``run.json`` through the runner's ``engine.finalize.finish_record``: status
``ok`` / ``failed``, reason, the root-cause rank when a peer failed first, steps kept, wall time
and ``verdict`` over the rows - ``testbed report DIR`` and the gate's checks read it unchanged.
The first ending decides the status; a later ``finish`` (a script that handled SIGTERM itself and
went on) rewrites the counts and the verdict, never the status.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from testbed.engine.checkin import CheckIn
from testbed.engine.finalize import Ending, finish_record
from testbed.record.files import RUN_FILE, RunDirError, environment, write_json_atomic
from testbed.record.rundir import DirLock, claim_run_dir
from testbed.schema import run as K

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_NAME", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
               "SLURM_JOB_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
SECONDARY = ("while rank", "Connection closed by peer", "Connection reset", "Broken pipe", "stopped by SIG",
             "NCCL communicator was aborted", "recvBytes", "Socket Timeout")


def launcher() -> dict[str, Any]:
    """What started this process's ranks, and the variables that say so."""
    env = os.environ
    if any(k.startswith("ACCELERATE_") for k in env):
        kind = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env:
        kind = "torchrun"
    elif "SLURM_JOB_ID" in env:
        kind = "slurm"
    elif "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        kind = "mpi"
    else:
        kind = "unknown"
    return {"kind": kind, "env": {k: env[k] for k in LAUNCH_VARS if k in env}}


def rank_environment(rank: int, device: torch.device, group: dist.ProcessGroup | None) -> dict[str, Any]:
    """The part of a rank's environment that can differ between ranks."""
    return {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", "-1")), "hostname": platform.node(),
            "pid": os.getpid(), "device": str(device), "backend": dist.get_backend(group),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


class MonitorRecord:
    """One monitor's ``out_dir`` record (module doc). Rank 0 owns the files; every rank calls
    ``claim`` (collective through ``checkin``) and ``finish``."""

    def __init__(self, out_dir: Path, rank: int, world_size: int, checkin: CheckIn | None):
        self.out_dir, self.rank, self.world_size, self.checkin = Path(out_dir), rank, world_size, checkin
        self.lock: DirLock | None = None
        self.run: dict[str, Any] = {}
        self.started = time.monotonic()
        self.ending: Ending | None = None

    def claim(self, overwrite: bool) -> str | None:
        """Rank 0 decides whether ``out_dir`` is this run's; every rank raises the same RunDirError
        if not. Returns what an overwrite replaced (rank 0), else None."""
        decision, replaced = "", None
        if self.rank == 0:
            try:
                self.lock = claim_run_dir(self.out_dir, overwrite)
                replaced = self.lock.replaces
            except RunDirError as e:
                decision = e.why
        decision = self._share_decision(decision)
        if decision:
            raise RunDirError(self.out_dir, decision.replace("pass --overwrite", "pass overwrite=True"))
        return replaced  # claim_run_dir removed the earlier record (only its own files, never a link)

    def _share_decision(self, decision: str) -> str:
        if self.world_size == 1:
            return decision
        if self.checkin is not None:
            if self.rank == 0:
                self.checkin.announce("claim", decision)
                return decision
            return self.checkin.hear("claim", "attach (rank 0 decides whether out_dir is free)")
        box = [decision]
        dist.broadcast_object_list(box, src=0)  # no store: the process group itself
        return str(box[0])

    def start(self, info: dict[str, Any], rank_env: dict[str, Any], backend: str, device: str) -> None:
        """Every rank's environment to rank 0, which writes run.json (status ``running``)."""
        ranks = self._gather_environments(rank_env)
        if self.rank != 0:
            return
        self.run = {K.STATUS: K.RUNNING, K.STARTED_AT: time.time(), K.WORLD_SIZE: self.world_size,
                    K.LAUNCHER: launcher(), K.ENVIRONMENT: environment(backend, self.world_size, device),
                    K.RANKS: ranks, **info}
        write_json_atomic(self.out_dir / RUN_FILE, self.run)

    def _gather_environments(self, rank_env: dict[str, Any]) -> list[dict[str, Any]]:
        if self.world_size == 1:
            return [rank_env]
        if self.checkin is not None:
            self.checkin.publish("env", json.dumps(rank_env, default=str))
            if self.rank != 0:
                return []
            return [json.loads(v) for v in self.checkin.collect("env", "attach (every rank's environment)")]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, rank_env)
        return out

    def finish(self, ending: Ending) -> dict[str, Any] | None:
        """Write the final run.json (rank 0; never raises). The first ending's status and reason
        stay. Returns the record written, or None (not rank 0, or nothing to write)."""
        if self.ending is None:
            self.ending = ending
            if ending.status != K.OK:
                self._name_root_cause(ending)
        self.ending.wall_time_s = time.monotonic() - self.started
        if self.rank != 0 or not self.run:
            return None
        try:
            finish_record(self.out_dir, self.run, self.ending)
        except Exception as e:  # noqa: BLE001 - finish_record never raises; belt and braces at exit
            sys.stderr.write(f"testbed: could not finish {self.out_dir / RUN_FILE}: {type(e).__name__}: {e}\n")
        return self.run

    def _name_root_cause(self, ending: Ending) -> None:
        """A failure that only says a peer went away (or a signal torchrun sent because one did) is
        secondary: the first peer that failed on its own is the root cause (as in the runner)."""
        markers = self.checkin.ended_peers() if self.checkin is not None else []
        ending.rank_reports = markers
        failed = [m for m in markers if m.get("kind") == "failed" and not _secondary(m.get("error") or "")]
        if failed and _secondary(ending.reason):
            root = failed[0]
            seen = (ending.reason.splitlines() or [""])[0]
            seen = seen if len(seen) <= 160 else seen[:157] + "..."
            ending.reason = f"rank {root['rank']} {root['what']}" + (f": {root['error']}" if root.get("error") else "") \
                + f" (then rank {self.rank}: {seen})"
            ending.failed_rank, ending.failed_step = root["rank"], root.get("step")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _secondary(text: str) -> bool:
    return any(marker in text for marker in SECONDARY)


def verdict_line(run: dict[str, Any] | None, out_dir: Path) -> str | None:
    """``testbed: runs/mine: ok, 40 steps; verdict: consistent - ...`` for the person watching."""
    if not run:
        return None
    verdict = run.get(K.VERDICT) or {}
    status = run.get(K.STATUS)
    reason = f" ({run.get(K.REASON)})" if status != K.OK and run.get(K.REASON) else ""
    return (f"testbed: {out_dir}: {status}{reason}, {run.get(K.STEPS_KEPT)} rows; verdict: "
            f"{verdict.get('headline', '-')} (in {out_dir / RUN_FILE})")


