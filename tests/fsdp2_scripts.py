"""A user's own loop with ``testbed.attach`` on DDP and on FSDP2, checked against brute force, under torchrun
(launched by tests/test_fsdp2.py; several checks per launch, because a launch costs seconds).

    torchrun --standalone --nproc-per-node N tests/fsdp2_scripts.py OUT.json

For each configuration (DDP / FSDP2 × fp32 / bf16 gradients, plus DDP with
``gradient_as_bucket_view`` and FSDP2 with gradient accumulation) every rank trains a small MLP
whose layer sizes are odd (so FSDP pads every unit and DDP's buckets do not split evenly) for
three steps: step 0 with the pairwise matrix (all-to-all path), step 1 measured without it, step 2
pairwise again. The hook keeps every local gradient it saw (``keep_local``); they are all-gathered
in float64 and the brute-force oracle (``metrics.step.brute_force``) is computed from them. Rank 0
writes ``{config: [row + {"self_check": oracle}, ...]}``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import testbed
from testbed.engine import fsdp
from testbed.metrics.step import brute_force

CONFIGS: dict[str, dict[str, Any]] = {
    "ddp-fp32": {"kind": "ddp", "dtype": torch.float32},
    "ddp-bf16": {"kind": "ddp", "dtype": torch.bfloat16},
    "ddp-bucket-view": {"kind": "ddp", "dtype": torch.float32, "bucket_view": True},
    "fsdp2-fp32": {"kind": "fsdp2", "dtype": torch.float32},
    "fsdp2-bf16": {"kind": "fsdp2", "dtype": torch.bfloat16},
    "fsdp2-accum": {"kind": "fsdp2", "dtype": torch.float32, "micro": 2},
}
STEPS, BATCH = 3, 6


def model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    # ~280k parameters: DDP's 1 MiB first bucket is exceeded, so there are two buckets
    return torch.nn.Sequential(torch.nn.Linear(9, 517), torch.nn.GELU(), torch.nn.Linear(517, 517), torch.nn.GELU(),
                               torch.nn.Linear(517, 5)).to(dtype)


def wrap(net: torch.nn.Module, cfg: dict[str, Any]) -> torch.nn.Module:
    if cfg["kind"] == "fsdp2":
        return fsdp.shard(net, reshard_after_forward=True)
    return DDP(net, gradient_as_bucket_view=cfg.get("bucket_view", False))


def oracle(state: Any) -> dict[str, Any]:
    local = torch.cat([b.reshape(-1) for b in state.local_buckets]).double()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return brute_force(torch.stack(gathered).numpy())


def run_config(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    rank = dist.get_rank()
    net = wrap(model(cfg["dtype"]), cfg)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    monitor = testbed.attach(net, every=1, pairwise_every=2, weight_check_every=1, batch_size=BATCH)
    monitor.state.keep_local = True
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    rows = []
    for _ in range(STEPS):
        micro = cfg.get("micro", 1)
        total = torch.zeros(())
        for i in range(micro):
            if fsdp.is_sharded(net):
                net.set_requires_gradient_sync(i == micro - 1)
            x = torch.randn(BATCH, 9, generator=gen).to(cfg["dtype"])
            y = torch.randint(0, 5, (BATCH,), generator=gen)
            loss = torch.nn.functional.cross_entropy(net(x).float(), y) / micro
            loss.backward()
            total += loss.detach()
        want = oracle(monitor.state)  # before step(): the next begin_step clears the kept buckets
        optimizer.step()
        optimizer.zero_grad()
        row = monitor.step(total)
        assert row is not None
        rows.append({**row, "self_check": want})
    return rows


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {name: run_config(cfg) for name, cfg in CONFIGS.items()}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
