"""A one-process training script with the monitor (gloo, world size 1), for tests/test_monitor_lifecycle.py:

    lifecycle_script.py MODE OUT

MODE: ``default`` (no signal handler of its own: runs until stopped), ``handlers`` (ignores SIGHUP
like ``nohup``, and has its own SIGTERM handler that prints and exits 3), ``raise`` (a ValueError
escapes the loop at step 3). Prints ``step k`` after each step.
"""
from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import testbed


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "handlers":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

        def own(signum: int, frame: object) -> None:
            print("own handler ran", flush=True)
            sys.exit(3)

        signal.signal(signal.SIGTERM, own)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = DDP(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = testbed.attach(model, out_dir=out)
    for step in range(100000):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(loss)
        if mode == "raise" and step == 3:
            raise ValueError("boom")
        print(f"step {step}", flush=True)


if __name__ == "__main__":
    main()
