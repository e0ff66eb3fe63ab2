"""A Lightning training script (``strategy="ddp"``) with the testbed callback, and reported mistakes as switches.

    torchrun --nproc-per-node 3 examples/bugs/lightning_train.py --bug seed_rank --out runs/pl
    torchrun --nproc-per-node 3 examples/bugs/lightning_train.py --bug none,seed_rank --out runs/pl

Lightning injects a ``DistributedSampler`` into the train DataLoader and calls its ``set_epoch``
itself, so the classic sampler mistakes take other shapes here. Each bug is the line marked
``# BUG``:

- ``none`` (healthy twin), ``bn`` (healthy twin with BatchNorm), ``shuffle_false`` (healthy twin:
  ``shuffle=False`` repeats the order by design, and the callback sees it in the loader);
- ``seed_rank``: ``seed_everything(42 + rank)`` - the injected sampler takes its seed from
  ``PL_GLOBAL_SEED``, so every rank shuffles with another seed and the shards overlap;
- ``iterable``: an ``IterableDataset`` - Lightning adds no sampler to it, so every rank streams the
  whole dataset (Lightning-AI/pytorch-lightning#15734);
- ``bn_no_broadcast``: ``DDPStrategy(broadcast_buffers=False)`` with BatchNorm;
- ``frozen_reinit``: a frozen layer re-initialised on rank 2 at the start of epoch 2, after the
  strategy wrapped the model (Lightning-AI/pytorch-lightning#20340).
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

HEALTHY = ("none", "bn", "shuffle_false")
BUGS = ("seed_rank", "iterable", "bn_no_broadcast", "frozen_reinit")
EPOCHS, BATCH, SIZE = 3, 8, 192


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SIZE, 16, generator=g)
    return TensorDataset(x, (x @ torch.randn(16, 4, generator=g)).argmax(dim=1))


class Stream(IterableDataset):
    """The dataset as a stream, the same on every rank (no per-rank sharding)."""

    def __init__(self, data: TensorDataset):
        self.data = data

    def __iter__(self):
        return iter(zip(*self.data.tensors))


def module_for(bug: str):
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            norm = [nn.BatchNorm1d(32)] if bug in ("bn", "bn_no_broadcast") else []
            self.net = nn.Sequential(nn.Linear(16, 32), *norm, nn.ReLU(), nn.Linear(32, 4))
            if bug == "frozen_reinit":
                self.net[0].requires_grad_(False)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def on_train_epoch_start(self) -> None:
            if bug == "frozen_reinit" and self.current_epoch == 1 and self.global_rank == 2:
                with torch.no_grad():
                    self.net[0].reset_parameters()  # BUG: a frozen layer re-initialised on one rank

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Classifier


def train(bug: str, out: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from testbed import TestbedLightningCallback

    rank = int(os.environ.get("RANK", "0"))
    pl.seed_everything(42 + rank if bug == "seed_rank" else 42, verbose=False)  # BUG (seed_rank): + rank
    data = make_data()
    loader = DataLoader(Stream(data) if bug == "iterable" else data, batch_size=BATCH,  # BUG (iterable)
                        shuffle=bug not in ("iterable", "shuffle_false"), drop_last=True)
    strategy = DDPStrategy(broadcast_buffers=bug != "bn_no_broadcast")  # BUG (bn_no_broadcast)
    trainer = pl.Trainer(accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", "1")), strategy=strategy,
                         max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[TestbedLightningCallback(out_dir=out / bug, batch_size=BATCH, overwrite=True)])
    trainer.fit(module_for(bug)(), train_dataloaders=loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bug", default="none", help="one or more of: " + ", ".join(HEALTHY + BUGS))
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    for bug in args.bug.split(","):
        if bug not in HEALTHY + BUGS:
            raise SystemExit(f"unknown bug {bug!r}; known: {', '.join(HEALTHY + BUGS)}")
        train(bug, args.out)


if __name__ == "__main__":
    main()
