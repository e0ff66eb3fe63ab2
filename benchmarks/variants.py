"""The same data-parallel training step in each variant the overhead benchmark compares.

All variants live in one process group and are stepped in turn, so load drift on a shared
machine hits them alike. Two DDP models of identical shape and initialisation are built: one with
no comm hook (DDP's built-in C++ all-reduce) and one with ``testbed.engine.hook.install``. The naive
variant reuses the first model's inner module outside DDP, as a user without a comm hook would
have to (the local gradient must exist before any all-reduce replaces it).

- ``plain``    (a): DDP, no hook registered.
- ``metrics``  (b): testbed hook measuring, plus ``testbed.engine.worker.gather_metrics`` — the exact
  per-step code path of ``testbed run`` (scalar all_gather, step_metrics, noise scale).
- ``pairwise`` (c): as (b), plus the exact N×N Gram/cosine matrix every step.
- ``naive``    (d): backward without DDP, all_gather of every rank's full flattened gradient,
  metrics and the mean from the gathered [N, D] matrix, mean written back as the gradient.
- ``idle``     (e): hook installed, step not measured — what the steps between measurements cost
  with ``metrics.every = k > 1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from testbed.engine import worker
from testbed.workloads.data import ShardedSampler
from testbed.engine.hook import install
from testbed.metrics.step import NoiseScaleEMA, mean_offdiagonal, pairwise_cosine, step_metrics
from testbed.scenario.tables import DATASETS, MODELS, OPTIMIZERS
from testbed.scenario.spec import parse_scenario

VARIANTS: tuple[str, ...] = ("plain", "metrics", "pairwise", "naive", "idle")
LABELS: dict[str, str] = {
    "plain": "(a) plain DDP",
    "metrics": "(b) DDP + testbed metrics",
    "pairwise": "(c) DDP + metrics + pairwise",
    "naive": "(d) naive all_gather",
    "idle": "(e) hook, unmeasured step",
}


@dataclass(frozen=True)
class ModelSize:
    """An MLP shape (testbed's ``mlp`` model over ``synthetic`` data with 8 classes)."""

    label: str
    features: int
    hidden: int
    depth: int
    classes: int = 8

    @property
    def parameters(self) -> int:
        widths = [self.features] + [self.hidden] * self.depth + [self.classes]
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


SIZES: dict[str, ModelSize] = {s.label: s for s in (
    ModelSize("1M", features=512, hidden=512, depth=4),       # 1.05M parameters
    ModelSize("11M", features=1536, hidden=1024, depth=10),   # 11.0M: the reference point
    ModelSize("50M", features=2048, hidden=2048, depth=12),   # 50.4M
)}

_gather_flat: Callable[..., Any] = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Bench:
    """Both models, their optimizers and one fixed batch per rank for one (size, batch) config."""

    def __init__(self, size: ModelSize, batch: int, rank: int, world_size: int, seed: int = 0):
        self.size, self.batch_size, self.rank, self.world_size = size, batch, rank, world_size
        self.device = torch.device("cpu")
        scenario = parse_scenario({
            "name": f"bench-{size.label}-b{batch}", "world_size": world_size, "steps": 1_000_000, "seed": seed,
            "model": {"kind": "mlp", "hidden": size.hidden, "depth": size.depth},
            "data": {"kind": "synthetic", "batch_size": batch, "size": world_size * batch,
                     "features": size.features, "classes": size.classes},
            "optim": {"kind": "sgd", "lr": 1e-4},
            "metrics": {"every": 1, "weight_check_every": 0},
        }, source="<benchmark>")
        dataset = DATASETS.get("synthetic")(seed, **scenario.data.params)
        self.batch = dataset.batch(torch.arange(rank * batch, (rank + 1) * batch))
        self.plain = DDP(self._model(scenario, dataset))
        self.hooked = DDP(self._model(scenario, dataset))
        self.hook = install(self.hooked)
        self.opt_plain = OPTIMIZERS.get("sgd")(self.plain.parameters(), **scenario.optim.params)
        self.opt_hooked = OPTIMIZERS.get("sgd")(self.hooked.parameters(), **scenario.optim.params)
        ctx = worker.RankContext(rank, world_size, rank, Path("."))
        # The worker's own job record, so gather_metrics runs exactly as in `testbed run`.
        self.job = worker._Job(scenario, ctx, self.device, self.hooked, self.opt_hooked, self.hook,
                               ShardedSampler(dataset.size, world_size, batch), dataset,
                               [g["lr"] for g in self.opt_hooked.param_groups],
                               NoiseScaleEMA(scenario.metrics.noise_scale_ema),
                               params=list(self.hooked.parameters()))
        self.steps_done = 0
        self.last_row: dict[str, Any] | None = None

    @staticmethod
    def _model(scenario: Any, dataset: Any) -> torch.nn.Module:
        torch.manual_seed(scenario.seed)
        return MODELS.get(scenario.model.kind)(dataset, **scenario.model.params)

    def step(self, variant: str) -> None:
        {"plain": self._plain, "metrics": self._metrics, "pairwise": self._pairwise,
         "naive": self._naive, "idle": self._idle}[variant]()
        self.steps_done += 1

    @staticmethod
    def _update(optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _plain(self) -> None:
        self.plain(**self.batch).backward()
        self._update(self.opt_plain)

    def _hooked_step(self, measure: bool, pairwise: bool) -> None:
        self.hook.begin_step(measure, pairwise, None, None, self.device)
        loss = self.hooked(**self.batch)
        loss.backward()
        self._update(self.opt_hooked)
        if measure or pairwise:
            self.last_row = worker.gather_metrics(self.job, self.steps_done, loss.detach().double(), True, pairwise)

    def _metrics(self) -> None:
        self._hooked_step(True, False)

    def _pairwise(self) -> None:
        self._hooked_step(True, True)

    def _idle(self) -> None:
        self._hooked_step(False, False)

    def _naive(self) -> None:
        module = self.plain.module  # outside DDP: no reducer all-reduce, local gradients stay local
        loss = module(**self.batch)
        loss.backward()
        params = [p for p in module.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        gathered = torch.empty(self.world_size * flat.numel(), dtype=flat.dtype)
        _gather_flat(gathered, flat)
        grads = gathered.view(self.world_size, -1)
        gram = (grads @ grads.T).double()
        mean = grads.mean(dim=0)
        offset = 0
        for p in params:
            p.grad.copy_(mean[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        losses = [torch.empty((), dtype=torch.float64) for _ in range(self.world_size)]
        dist.all_gather(losses, loss.detach().double())
        row = step_metrics([float(x) for x in losses], gram.diagonal().tolist(), gram.mean(dim=1).tolist())
        row["pairwise_cos_mean"] = mean_offdiagonal(pairwise_cosine(gram.numpy()))
        self.last_row = row
        self._update(self.opt_plain)
