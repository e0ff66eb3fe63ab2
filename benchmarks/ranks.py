"""Run the variants in a spawned gloo process group and collect per-round timings, peak memory
and counted traffic.

Two kinds of run per world size, each its own process group:
- ``time``: every config warms each variant up, then runs ``rounds`` rounds; in each round every
  variant runs one block of steps, the order rotating by one per round (a b c d, b c d a, ...), so
  a burst of load from the other tenants of the machine hits all variants alike. A block's time per
  step is the slowest rank's wall time (one all-reduce after the timed loop, never inside it); its
  CPU time per step is the sum over ranks of process CPU time (all threads, gloo's included),
  which time-sharing with other tenants inflates far less than wall time.
- ``memory``: glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go
  back to the OS and RSS follows live tensors; before each variant's block the kernel's peak-RSS
  mark is reset (``/proc/self/clear_refs`` ← 5), after it ``VmHWM`` is read: a per-variant peak in
  one process. One step per variant then runs under the collective counter (bytes per step).
The full benchmark runs them as separate process groups (``modes``), because pinning the mmap
threshold changes allocation cost; the smoke test runs both in one.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import multiprocessing as mp
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from benchmarks.counting import counting, reducer_bucket_sizes
from benchmarks.variants import SIZES, Bench

MMAP_THRESHOLD = 1 << 18  # bytes; allocations above it are mmapped and unmapped on free


def read_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _agreed_max(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _gather_ints(values: list[int]) -> list[list[int]]:
    t = torch.tensor(values, dtype=torch.int64)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def _time_config(bench: Bench, plan: dict[str, Any]) -> list[dict[str, Any]]:
    variants = plan["variants"]
    warm: list[float] = []
    for v in variants:
        for _ in range(plan["warmup"]):
            t0 = time.perf_counter()
            bench.step(v)
            warm.append(time.perf_counter() - t0)
    step_estimate = _agreed_max([min(warm)])[0]
    steps = max(plan["min_steps"], math.ceil(plan["block_s"] / max(step_estimate, 1e-6)))
    blocks: list[tuple[int, str, float, float]] = []
    for r in range(plan["rounds"]):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                bench.step(v)
            blocks.append((r, v, (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps))
    slowest = _agreed_max([b[2] for b in blocks])
    cpu = torch.tensor([b[3] for b in blocks], dtype=torch.float64)
    dist.all_reduce(cpu)  # CPU seconds of all ranks (all threads): robust to time-sharing with other load
    return [{"round": r, "variant": v, "step_s": s, "cpu_s": c, "steps": steps}
            for (r, v, _, _), s, c in zip(blocks, slowest, cpu.tolist())]


def _memory_config(bench: Bench, plan: dict[str, Any]) -> list[dict[str, Any]]:
    variants = plan["variants"]
    for v in variants:
        for _ in range(plan["warmup"]):
            bench.step(v)
    out = []
    for v in variants:
        peaks = []
        for _ in range(plan["memory_repeats"]):
            gc.collect()
            dist.barrier()
            resettable = reset_peak_rss()
            base = read_status_kb("VmRSS") or 0
            for _ in range(plan["memory_steps"]):
                bench.step(v)
            peaks.append((base, read_status_kb("VmHWM") or 0))
        base, peak = min(peaks, key=lambda p: p[1] - p[0])  # least disturbed repeat
        with counting() as counter:
            bench.step(v)
        traffic = counter.total()
        ddp = {"plain": "plain", "metrics": "hooked", "a2a": "hooked", "idle": "hooked", "pairwise": "legacy",
               "state": "hooked", "monitor": "monitored"}.get(v)
        buckets = reducer_bucket_sizes(bench.models[ddp]) if ddp else []
        if v == "plain":  # the C++ reducer's all-reduce never reaches Python: count its buckets
            traffic = {"sent": traffic["sent"] + sum(buckets), "received": traffic["received"] + sum(buckets),
                       "calls": traffic["calls"] + len(buckets)}
        per_rank = _gather_ints([base, peak, int(resettable)])
        out.append({"variant": v, "rss_base_kb": [p[0] for p in per_rank], "rss_peak_kb": [p[1] for p in per_rank],
                    "peak_resettable": all(p[2] for p in per_rank), "traffic": traffic,
                    "traffic_by_op": {"sent": dict(counter.sent), "received": dict(counter.received),
                                      "calls": dict(counter.calls)},
                    "reducer_buckets": buckets, "hook_all_reduce_calls": counter.call_sizes.get("all_reduce", []),
                    "hook_all_to_all_calls": counter.call_sizes.get("all_to_all_single", [])})
    return out


def rank_main(rank: int, world_size: int, port: int, plan: dict[str, Any], result_path: str) -> None:
    """One rank: join the group, run every config of the plan, rank 0 writes the records."""
    torch.set_num_threads(plan["threads"])
    store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                          timeout=datetime.timedelta(seconds=plan["timeout_s"]))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=plan["timeout_s"]))
    records: list[dict[str, Any]] = []
    try:
        for cfg in plan["configs"]:
            for mode in plan["modes"]:
                load_before = os.getloadavg()
                bench = Bench(SIZES[cfg["size"]], cfg["batch"], rank, world_size, variants=plan["variants"])
                rows = (_time_config if mode == "time" else _memory_config)(bench, plan)
                base = {"mode": mode, "world_size": world_size, "size": cfg["size"],
                        "parameters": bench.size.parameters, "batch": cfg["batch"],
                        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
                records += [{**base, **row} for row in rows]
                del bench
                gc.collect()
        if rank == 0:
            Path(result_path).write_text(json.dumps(records))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Environment for spawned children (they read it at start-up)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_world(world_size: int, plan: dict[str, Any], result_path: Path) -> list[dict[str, Any]]:
    """Spawn ``world_size`` ranks for one plan; bounded by ``plan['timeout_s']``; no rank survives."""
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=plan["timeout_s"]))
    env = {"OMP_NUM_THREADS": str(plan["threads"]), "MKL_NUM_THREADS": str(plan["threads"])}
    if "memory" in plan["modes"]:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, world_size, store.port, plan, str(result_path)),
                         name=f"bench-rank{r}") for r in range(world_size)]
    deadline = time.monotonic() + plan["timeout_s"]
    try:
        with _environment(**env):
            for p in procs:
                p.start()
        while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(2.0)  # let peers print their own errors, then stop everything
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join(timeout=10)
        del store
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        why = "timed out" if time.monotonic() >= deadline else "failed"
        raise RuntimeError(f"benchmark ranks {why} ({'+'.join(plan['modes'])} run, world size {world_size}): exit codes {codes}")
    return json.loads(result_path.read_text())
