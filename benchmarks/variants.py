"""The same data-parallel training step in each variant the overhead benchmark compares.

All variants live in one process group and are stepped in turn, so load drift on a shared
machine hits them alike. Each variant has its own model of identical shape and initialisation
(built only for the variants a run asks for): DDP with no comm hook (DDP's built-in C++
all-reduce), DDP with ``testbed.engine.hook.install``, DDP with the legacy chunked all-gather hook,
and two FSDP2 models sharded per layer (``testbed.engine.fsdp.shard``), one with testbed's
reduce-scatter. The naive variant reuses the plain model's inner module outside DDP, as a user
without a comm hook would have to (the local gradient must exist before any all-reduce replaces it).

- ``plain``    (a): DDP, no hook registered.
- ``metrics``  (b): testbed hook measuring, plus ``testbed.engine.worker.gather_metrics`` — the exact
  per-step code path of ``testbed run`` (scalar all_gather, step_metrics, noise scale).
- ``pairwise`` (c): the previous pairwise design (benchmarks/legacy_pairwise.py): chunked
  all-gather of every bucket plus the all-reduce, every step.
- ``a2a``      (c2): testbed's pairwise path: (b) with the exact N×N matrix every step, every bucket
  through the all-to-all path (``metrics.pairwise_every = 1``).
- ``naive``    (d): backward without DDP, all_gather of every rank's full flattened gradient,
  metrics and the mean from the gathered [N, D] matrix, mean written back as the gradient.
- ``idle``     (e): hook installed, step not measured — what the steps between measurements cost
  with ``metrics.every = k > 1``.
- ``fsdp``     (f): plain FSDP2 (``fully_shard`` per Linear, then the root; default reduce-scatter).
- ``fsdp_metrics`` (f2): FSDP2 with testbed's reduce-scatter measuring every step, pairwise matrix
  included, plus the worker's row gather (compared with (f), not with plain DDP).

Opt-in (``--variants`` / ``--state-check``), the cost of the exact channels (issue 22):

- ``state``    (g): (b) plus the exact state check (parameter and buffer checksums in the step's one
  all-gather) on every step; its ratio column is against (b), so it is the price of one check.
- ``ledger``   (i): (b) plus the data ledger (``StepPath(..., ledger_samples=64)``: the forward
  pre-hook fingerprinting every sample on the device, the 64-fingerprint payload in the step's one
  all-gather, the host-side ledger update); its own DDP model (the pre-hook must not run in the
  other variants' forwards); its ratio column is against (b): the ledger's price per step.
- ``monitor``  (h): ``testbed.attach(model, batch_size=...)`` with every default - metrics every
  step, the state check at step 0 and every ``WEIGHT_CHECK_EVERY`` steps, the data ledger, the
  settings exchange, the store check-in before each all-gather, the built-in alarms (no
  ``out_dir``: no files) - against plain DDP.

(b), (c2), (f2), (g) and (i) run ``testbed.engine.step_path.StepPath`` - the code path of
``testbed run`` and of the drop-in monitor - with the cadence each variant names; all but (i) with
the data ledger off (``ledger_samples=0``), as they were measured before the ledger existed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks import legacy_pairwise
from testbed.engine import fsdp
from testbed.engine.hook import install
from testbed.engine.step_path import StepPath
from testbed.metrics.step import mean_offdiagonal, pairwise_cosine, step_metrics
from testbed.scenario.cadence import Cadence
from testbed.scenario.tables import DATASETS, MODELS, OPTIMIZERS
from testbed.scenario.spec import parse_scenario

VARIANTS: tuple[str, ...] = ("plain", "metrics", "pairwise", "a2a", "naive", "idle", "fsdp", "fsdp_metrics")
STATE_VARIANTS: tuple[str, ...] = ("state", "ledger", "monitor")  # opt-in: the exact channels' cost
ALL_VARIANTS: tuple[str, ...] = VARIANTS + STATE_VARIANTS
LABELS: dict[str, str] = {
    "plain": "(a) plain DDP",
    "metrics": "(b) DDP + testbed metrics",
    "pairwise": "(c) pairwise, old chunked all-gather",
    "a2a": "(c2) DDP + metrics + pairwise, all-to-all",
    "naive": "(d) naive all_gather",
    "idle": "(e) hook, unmeasured step",
    "fsdp": "(f) plain FSDP2",
    "fsdp_metrics": "(f2) FSDP2 + testbed metrics + pairwise",
    "state": "(g) DDP + metrics + state check every step",
    "ledger": "(i) DDP + metrics + data ledger (64 fingerprints/rank)",
    "monitor": "(h) testbed.attach defaults (state check 1 in 10, data ledger, check-in, alarms)",
}
# ratio column: against this variant, else plain DDP
BASELINE: dict[str, str] = {"fsdp_metrics": "fsdp", "state": "metrics", "ledger": "metrics"}
_DDP_HOOKED = ("metrics", "a2a", "idle", "state")
_CADENCE = {"metrics": Cadence(1, 0, 0), "a2a": Cadence(1, 1, 0), "state": Cadence(1, 0, 1),
            "fsdp_metrics": Cadence(1, 1, 0), "ledger": Cadence(1, 0, 0)}
LEDGER_SAMPLES = 64


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
    """The models of the variants asked for, their optimizers and one fixed batch per rank for
    one (size, batch) config."""

    def __init__(self, size: ModelSize, batch: int, rank: int, world_size: int, seed: int = 0,
                 variants: tuple[str, ...] | list[str] = VARIANTS):
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
        self.models: dict[str, torch.nn.Module] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        wanted = set(variants)

        def add(name: str, model: torch.nn.Module) -> torch.nn.Module:
            self.models[name] = model
            self.opts[name] = OPTIMIZERS.get("sgd")(model.parameters(), **scenario.optim.params)
            return model

        if wanted & {"plain", "naive"}:
            self.plain = add("plain", DDP(self._model(scenario, dataset)))
        if wanted & set(_DDP_HOOKED):
            self.hooked = add("hooked", DDP(self._model(scenario, dataset)))
            self.hook = install(self.hooked)
        if "pairwise" in wanted:
            self.legacy = add("legacy", DDP(self._model(scenario, dataset)))
            self.legacy_hook = legacy_pairwise.install(self.legacy)
        if "fsdp" in wanted:
            add("fsdp", fsdp.shard(self._model(scenario, dataset)))
        if "fsdp_metrics" in wanted:
            self.fsdp_hooked = add("fsdp_metrics", fsdp.shard(self._model(scenario, dataset)))
            self.fsdp_hook = fsdp.install(self.fsdp_hooked)
        if "monitor" in wanted:  # the drop-in monitor exactly as a user attaches it (no out_dir: no files)
            import testbed

            self.monitored = add("monitored", DDP(self._model(scenario, dataset)))
            # fixed_order: the benchmark steps one fixed batch, which the ledger would (rightly) report
            self.monitor = testbed.attach(self.monitored, batch_size=batch, fixed_order=True)
        if "ledger" in wanted:
            self.ledgered = add("ledgered", DDP(self._model(scenario, dataset)))
            self.ledger_hook = install(self.ledgered)
        self.paths: dict[str, StepPath] = {}  # the step path of `testbed run` and of the monitor
        for v in wanted & set(_CADENCE):
            model, state = {"fsdp_metrics": (getattr(self, "fsdp_hooked", None), getattr(self, "fsdp_hook", None)),
                            "ledger": (getattr(self, "ledgered", None), getattr(self, "ledger_hook", None))
                            }.get(v, (getattr(self, "hooked", None), getattr(self, "hook", None)))
            self.paths[v] = StepPath(model, state, _CADENCE[v], device=self.device, batch_size=batch,
                                     noise_scale_ema=scenario.metrics.noise_scale_ema,
                                     ledger_samples=LEDGER_SAMPLES if v == "ledger" else 0)
        self.steps_done = 0
        self.last_row: dict[str, Any] | None = None

    @staticmethod
    def _model(scenario: Any, dataset: Any) -> torch.nn.Module:
        torch.manual_seed(scenario.seed)
        return MODELS.get(scenario.model.kind)(dataset, **scenario.model.params)

    def step(self, variant: str) -> None:
        {"plain": self._plain, "metrics": self._metrics, "pairwise": self._pairwise, "a2a": self._a2a,
         "naive": self._naive, "idle": self._idle, "fsdp": self._fsdp, "fsdp_metrics": self._fsdp_metrics,
         "state": self._state, "ledger": self._ledger, "monitor": self._monitor}[variant]()
        self.steps_done += 1

    def _update(self, name: str) -> None:
        self.opts[name].step()
        self.opts[name].zero_grad(set_to_none=True)

    def _plain(self) -> None:
        self.plain(**self.batch).backward()
        self._update("plain")

    def _path_step(self, variant: str) -> None:
        """One step through ``StepPath`` with the variant's cadence (begin, forward, backward,
        optimizer, end: the row)."""
        path = self.paths[variant]
        model = {"fsdp_metrics": "fsdp_metrics", "ledger": "ledgered"}.get(variant, "hooked")
        path.begin(self.steps_done)
        loss = self.models[model](**self.batch)
        loss.backward()
        self._update(model)
        self.last_row = path.end(self.steps_done, loss.detach().double())

    def _metrics(self) -> None:
        self._path_step("metrics")

    def _a2a(self) -> None:
        self._path_step("a2a")

    def _state(self) -> None:
        self._path_step("state")

    def _ledger(self) -> None:
        self._path_step("ledger")

    def _idle(self) -> None:
        self.hook.begin_step(False, False, None, None, self.device)
        self.models["hooked"](**self.batch).backward()
        self._update("hooked")

    def _monitor(self) -> None:
        loss = self.monitored(**self.batch)
        loss.backward()
        self._update("monitored")
        self.last_row = self.monitor.step(loss)

    def _pairwise(self) -> None:
        self.legacy_hook.begin_step(True, True, None, None, self.device)
        loss = self.legacy(**self.batch)
        loss.backward()
        self._update("legacy")
        self.last_row = legacy_pairwise.pairwise_row(self.legacy_hook.acc, loss, self.world_size)

    def _fsdp(self) -> None:
        self.models["fsdp"](**self.batch).backward()
        self._update("fsdp")

    def _fsdp_metrics(self) -> None:
        self._path_step("fsdp_metrics")

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
        self._update("plain")
