"""Where the per-step metric cost goes, and why the hook sums fp32 dots in chunks.

    python benchmarks/profile_hook.py              # 2 ranks, 11M MLP, 64 samples/rank
    python benchmarks/profile_hook.py --size 50M --batch 512 --steps 5

Part 1 (one process): relative error of ‖g‖² and g·ḡ against float64 for one fp32 dot over the
whole vector and for the hook's chunked sums, and their single-thread cost (best of N).
Part 2 (2 gloo ranks): per rank, process CPU time per step of plain DDP and of the metrics step,
with the two metric components timed where they run: ``BucketAccumulator.add_pairs`` (thread
time, inside the hook's callback on gloo's thread) and ``StepPath.end`` (main thread).
Part 3 (2 gloo ranks): the metric step's wall-time overhead taken apart in interleaved rounds:
plain DDP, hook not measuring (``idle``), hook measuring without the dot products (``nodots``),
and the full metric step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from testbed.metrics import step as metrics
from testbed.engine.step_path import StepPath  # noqa: E402


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def precision_and_cost(n: int, repeats: int = 15) -> dict[str, Any]:
    torch.manual_seed(0)
    g = torch.randn(n) * 1e-3 + 1e-4  # a gradient-like vector with a small common offset
    mean = g + torch.randn(n) * 1e-3
    exact_sq, exact_dot = float(g.double() @ g.double()), float(g.double() @ mean.double())

    def whole() -> tuple[float, float]:
        return float(torch.dot(g, g)), float(torch.dot(g, mean))

    def chunked() -> tuple[float, float]:
        acc = metrics.BucketAccumulator()
        acc.add_pairs([g], [mean])
        return float(acc.sq_norm), float(acc.dot_with_mean)

    out: dict[str, Any] = {"elements": n, "chunk": metrics.GRAM_CHUNK}
    for name, fn in (("one fp32 dot", whole), ("chunked (add_pairs)", chunked)):
        sq, dot = fn()
        out[name] = {"sq_norm_rel_err": abs(sq - exact_sq) / exact_sq, "dot_rel_err": abs(dot - exact_dot) / abs(exact_dot),
                     "best_ms": best_of(fn, repeats) * 1e3}
    return out


def _rank(rank: int, world: int, port: int, size: str, batch: int, steps: int, out: str) -> None:
    from benchmarks.variants import SIZES, Bench

    torch.set_num_threads(1)
    spent = {"add_pairs": 0.0, "gather_metrics": 0.0}
    add_pairs, gather = metrics.BucketAccumulator.add_pairs, StepPath.end

    def timed_pairs(self: metrics.BucketAccumulator, *a: Any) -> None:
        t = time.thread_time()
        add_pairs(self, *a)
        spent["add_pairs"] += time.thread_time() - t

    def timed_gather(*a: Any) -> Any:
        t = time.thread_time()
        row = gather(*a)
        spent["gather_metrics"] += time.thread_time() - t
        return row

    metrics.BucketAccumulator.add_pairs = timed_pairs  # type: ignore[method-assign]
    StepPath.end = timed_gather  # type: ignore[method-assign]
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=datetime.timedelta(seconds=600))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    bench = Bench(SIZES[size], batch, rank, world)
    for v in ("plain", "metrics"):
        bench.step(v)
        bench.step(v)
    result: dict[str, dict[str, float]] = {}
    for v in ("plain", "metrics", "plain", "metrics"):  # second pass kept: the first may be cold
        spent.update(add_pairs=0.0, gather_metrics=0.0)
        dist.barrier()
        c, w = time.process_time(), time.perf_counter()
        for _ in range(steps):
            bench.step(v)
        result[v] = {"cpu_ms": (time.process_time() - c) / steps * 1e3, "wall_ms": (time.perf_counter() - w) / steps * 1e3,
                     "add_pairs_ms": spent["add_pairs"] / steps * 1e3,
                     "gather_metrics_ms": spent["gather_metrics"] / steps * 1e3}
    Path(out.format(rank=rank)).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _decompose_rank(rank: int, world: int, port: int, size: str, batch: int, rounds: int, out: str) -> None:
    """Interleaved rounds of plain / idle / metrics without the dot products / metrics."""
    from benchmarks.ranks import _time_config
    from benchmarks.variants import SIZES, Bench

    class Decomposed(Bench):
        def step(self, variant: str) -> None:
            if variant != "nodots":
                return super().step(variant)
            real = metrics.BucketAccumulator.add_pairs
            metrics.BucketAccumulator.add_pairs = lambda self, *a: None  # type: ignore[method-assign]
            try:
                super().step("metrics")
            finally:
                metrics.BucketAccumulator.add_pairs = real  # type: ignore[method-assign]

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=datetime.timedelta(seconds=600))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    plan = {"variants": ["plain", "idle", "nodots", "metrics"], "warmup": 2, "min_steps": 3, "block_s": 0.3,
            "rounds": rounds}
    records = _time_config(Decomposed(SIZES[size], batch, rank, world), plan)
    if rank == 0:
        Path(out.format(rank=0)).write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


def per_rank_profile(size: str, batch: int, steps: int, tmp: Path, target: Callable[..., None] = _rank
                     ) -> list[Any]:
    import multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = str(tmp / "rank{rank}.json")
    procs = [ctx.Process(target=target, args=(r, 2, store.port, size, batch, steps, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
        if p.exitcode is None:
            p.kill()
            p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"profile ranks failed: {[p.exitcode for p in procs]}")
    return [json.loads(Path(out.format(rank=r)).read_text()) for r in range(2) if Path(out.format(rank=r)).exists()]


def main() -> int:
    import os
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="11M")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the decomposition (part 3)")
    args = p.parse_args()
    from benchmarks.variants import SIZES

    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()}")
    print(json.dumps(precision_and_cost(SIZES[args.size].parameters), indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        for r, res in enumerate(per_rank_profile(args.size, args.batch, args.steps, Path(tmp))):
            print(f"rank {r}: " + json.dumps({k: {m: round(x, 2) for m, x in v.items()} for k, v in res.items()}))
        records = per_rank_profile(args.size, args.batch, args.rounds, Path(tmp), _decompose_rank)[0]
    by: dict[str, dict[int, float]] = {}
    for rec in records:
        by.setdefault(rec["variant"], {})[rec["round"]] = rec["step_s"]
    for v, times in by.items():
        ratios = sorted(t / by["plain"][r] for r, t in times.items())
        print(f"{v:8s} wall × plain DDP, median of {len(ratios)} interleaved rounds: {ratios[len(ratios) // 2]:.3f} "
              f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f})")
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
