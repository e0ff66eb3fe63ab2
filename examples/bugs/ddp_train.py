"""An ordinary DDP training script - DistributedSampler, SGD, a few epochs, an eval pass per epoch -
with the testbed monitor attached, and the mistakes people report in public trackers as switches.

    torchrun --nproc-per-node 3 examples/bugs/ddp_train.py --bug no_set_epoch --out runs/bug
    torchrun --nproc-per-node 3 examples/bugs/ddp_train.py --bug none,bn,no_set_epoch --out runs/zoo

With several names each runs in turn (one record per bug: ``OUT/<bug>/run.json``), in one process
group. Every bug is the one line marked ``# BUG`` below; docs/bugs.md says where each comes from,
what goes wrong and what testbed reports. The healthy twins: ``none``, ``bn`` (BatchNorm, DDP's
default buffer broadcast), ``accum`` (gradient accumulation with ``no_sync``), ``fixed_order``
(``shuffle=False``, declared to the monitor), ``aug`` (augmentation seeded per rank).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import testbed

HEALTHY = ("none", "bn", "accum", "fixed_order", "aug")
BUGS = ("no_set_epoch", "sampler_seed", "no_sampler", "shuffle_false", "bn_no_broadcast", "ckpt_rank0",
        "frozen_reinit", "nan_rank", "same_aug_seed")
EPOCHS, BATCH, SIZE = 3, 8, 192


SEED = 0  # --seed: the data, the initial weights and the samplers' shared seed


def make_data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SIZE, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def make_model(bn: bool, frozen: bool) -> nn.Module:
    torch.manual_seed(SEED)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    layers = [nn.Linear(16, 32)] + ([nn.BatchNorm1d(32)] if bn else []) + [nn.ReLU(), nn.Linear(32, 4)]
    model = nn.Sequential(*layers)
    if frozen:
        model[0].requires_grad_(False)  # a frozen pretrained stem
    return model


def train(bug: str, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = make_data(SEED)
    model = make_model(bn=bug in ("bn", "bn_no_broadcast", "accum"), frozen=bug == "frozen_reinit")
    if bug == "bn_no_broadcast":
        with warnings_off():
            ddp = DDP(model, broadcast_buffers=False)  # BUG: every rank keeps its own BatchNorm statistics
    else:
        ddp = DDP(model)
    if bug == "ckpt_rank0":
        load_checkpoint_on_rank0(ddp, rank)  # BUG: a checkpoint loaded on rank 0 only, after wrapping
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    sampler = DistributedSampler(data, shuffle=bug not in ("shuffle_false", "fixed_order"), seed=SEED)
    if bug == "sampler_seed":
        sampler = DistributedSampler(data, shuffle=True, seed=SEED + rank)  # BUG: seed = base + rank
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler, drop_last=True)
    if bug == "no_sampler":
        loader = DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True,  # BUG: no DistributedSampler
                            generator=torch.Generator().manual_seed(SEED))
    accum = 2 if bug == "accum" else 1
    monitor = testbed.attach(ddp, out_dir=out / bug, optimizer=optimizer, batch_size=BATCH * accum,
                             fixed_order=bug == "fixed_order", overwrite=True)
    aug = torch.Generator().manual_seed(1000 + SEED + (0 if bug == "same_aug_seed" else rank))  # BUG (same_aug_seed)
    for epoch in range(EPOCHS):
        if bug != "no_set_epoch" and isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)  # (no_set_epoch: BUG - this line is missing)
        if bug == "frozen_reinit" and epoch == 1 and rank == 2:
            with torch.no_grad():
                ddp.module[0].reset_parameters()  # BUG: a frozen layer re-initialised on one rank
        ddp.train()
        losses = []
        for i, (x, y) in enumerate(loader):
            if bug in ("aug", "same_aug_seed"):
                x = x + 0.1 * torch.randn(x.shape, generator=aug)
            if bug == "nan_rank" and rank == 1 and epoch == 1 and i == 2:
                x = x.clone()
                x[0] = float("nan")  # BUG: a corrupt sample (a NaN feature) on rank 1
            sync = (i + 1) % accum == 0
            with contextlib.nullcontext() if sync else ddp.no_sync():
                loss = nn.functional.cross_entropy(ddp(x), y)
                (loss / accum).backward()
            losses.append(loss.detach())
            if sync:
                optimizer.step()
                optimizer.zero_grad()
                monitor.step(losses)
                losses = []
        evaluate(ddp, loader)
    monitor.close()


def evaluate(ddp: DDP, loader: DataLoader) -> None:
    """An eval pass through the DDP model (no gradients): the ledger and the state check skip it."""
    ddp.eval()
    with torch.no_grad():
        for x, _ in list(loader)[:2]:
            ddp(x)


def load_checkpoint_on_rank0(ddp: DDP, rank: int) -> None:
    path = Path(tempfile.gettempdir()) / f"bugzoo-ckpt-{os.getpid()}.pt"
    if rank == 0:
        other = make_model(bn=False, frozen=False)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.01)
        torch.save(other.state_dict(), path)
        ddp.module.load_state_dict(torch.load(path))
        path.unlink()


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bug", default="none", help="one or more of: " + ", ".join(HEALTHY + BUGS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0, help="data, initial weights and the samplers' seed")
    args = parser.parse_args()
    global SEED
    SEED = args.seed
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for bug in args.bug.split(","):
            if bug not in HEALTHY + BUGS:
                raise SystemExit(f"unknown bug {bug!r}; known: {', '.join(HEALTHY + BUGS)}")
            train(bug, args.out)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
