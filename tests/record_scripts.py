"""A user's plain DDP training script with the monitor attached, launched by tests/test_monitor_record.py
under ``python -m torch.distributed.run --standalone --nproc-per-node 2``:

    record_scripts.py MODE OUT [STEPS]

MODE:
- ``bugs``: two real mistakes - rank 0 loads a "checkpoint" after wrapping the model in DDP (the
  replicas start from different weights) and rank 1 steps its lr scheduler twice per step.
- ``plain``: a healthy loop (the second launch into the same OUT must be refused).
- ``long``: a healthy loop of STEPS steps that prints ``step k`` as it goes (stopped by SIGTERM).
- ``rank0_only``: ``monitor.step`` only on rank 0 after step 2 (the "log on rank 0 only" mistake).
- ``rank1_raises``: a ValueError escapes rank 1's loop after step 3.

No script calls ``monitor.close()``: the record is finalized by the monitor's exit handler.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import testbed


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    if mode == "bugs" and rank == 0:  # "resume" on rank 0 only, after DDP broadcast the initial weights
        with torch.no_grad():
            for p in model.module.parameters():
                p.add_(0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    monitor = testbed.attach(model, out_dir=out, batch_size=16, optimizer=optimizer)
    g = torch.Generator().manual_seed(rank)
    for step in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if mode == "bugs" and rank == 1:
            scheduler.step()  # stepped twice on one rank
        if mode == "rank0_only" and step >= 2 and rank != 0:
            continue  # the mistake: only rank 0 "logs"
        monitor.step(loss)
        if mode == "rank1_raises" and rank == 1 and step == 3:
            raise ValueError("bad batch on rank 1")
        if mode == "long" and rank == 0:
            print(f"step {step}", flush=True)


if __name__ == "__main__":
    main()
