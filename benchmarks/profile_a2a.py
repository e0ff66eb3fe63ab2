"""Where the time of the all-to-all path goes: DDP pairwise every step, and FSDP2 with metrics.

    python benchmarks/profile_a2a.py                       # 2 ranks, 11M MLP, 64 samples/rank
    python benchmarks/profile_a2a.py --size 11M --batch 512 --steps 10

2 gloo ranks (1 thread each) run the benchmark's variants (benchmarks/variants.py) — plain DDP,
DDP + pairwise through the all-to-all path (``a2a``), plain FSDP2 (``fsdp``) and FSDP2 + testbed
metrics (``fsdp_metrics``) — in interleaved blocks of ``--steps`` steps, ``--rounds`` times. Every
collective and metric component is timed where it runs (wall time, summed per step, rank 0):
``all_to_all_single`` and the all-gather of the mean slice (issue + wait) in the hook,
``add_gram`` and the row sum (``add_slices`` minus ``add_gram``), FSDP's default
``reduce_scatter_single`` and its parameter ``all_gather_single``, and the row gather
(``StepPath.end``). The rest of a step is forward, backward and the optimizer.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

VARIANTS = ("plain", "a2a", "fsdp", "fsdp_metrics")
spent: dict[str, float] = defaultdict(float)


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t
    return wrapper


def _instrument() -> None:
    from testbed.engine import fsdp, hook
    from testbed.engine.step_path import StepPath
    from testbed.metrics import step as metrics

    dist.all_to_all_single = _timed("all_to_all_single", dist.all_to_all_single)  # hook and fsdp call dist.*
    dist.reduce_scatter_single = _timed("reduce_scatter_single (FSDP default)", dist.reduce_scatter_single)
    dist.all_gather_single = _timed("all_gather_single (FSDP params)", dist.all_gather_single)
    fsdp._reduce_scatter_flat = dist.reduce_scatter_single  # testbed's delegate on unmeasured steps
    hook._all_gather_flat = _timed("all_gather of the mean slice (issue)", hook._all_gather_flat)
    add_gram, add_slices = metrics.BucketAccumulator.add_gram, metrics.BucketAccumulator.add_slices
    metrics.BucketAccumulator.add_gram = _timed("add_gram (Gram share)", add_gram)  # type: ignore[method-assign]
    metrics.BucketAccumulator.add_slices = _timed("add_slices (Gram + sum)", add_slices)  # type: ignore[method-assign]
    StepPath.end = _timed("StepPath.end (row)", StepPath.end)  # type: ignore[method-assign]


def _rank(rank: int, world: int, port: int, size: str, batch: int, steps: int, rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    _instrument()
    from benchmarks.variants import SIZES, Bench

    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=datetime.timedelta(seconds=1200))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    bench = Bench(SIZES[size], batch, rank, world, variants=VARIANTS)
    for v in VARIANTS:
        bench.step(v)
        bench.step(v)
    result: dict[str, dict[str, float]] = {v: defaultdict(float) for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            spent.clear()
            dist.barrier()
            t = time.perf_counter()
            for _ in range(steps):
                bench.step(v)
            result[v]["step"] += (time.perf_counter() - t) / steps / rounds
            for k, x in spent.items():
                result[v][k] += x / steps / rounds
    if rank == 0:
        Path(out).write_text(json.dumps({v: dict(d) for v, d in result.items()}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    import multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="11M")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    print(f"load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "profile.json")
        store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, 2, store.port, args.size, args.batch, args.steps, args.rounds, out))
                 for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=1800)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            raise RuntimeError(f"profile ranks failed: {[proc.exitcode for proc in procs]}")
        result = json.loads(Path(out).read_text())
    print(f"{args.size} MLP, 2 gloo ranks, {args.batch} samples/rank; ms per step on rank 0 (wall, mean of "
          f"{args.rounds} interleaved rounds × {args.steps} steps)")
    for v, parts in result.items():
        print(f"{v:13s} step {parts.pop('step') * 1e3:8.1f}   " +
              ", ".join(f"{k} {x * 1e3:.1f}" for k, x in sorted(parts.items(), key=lambda kv: -kv[1])))
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
