"""Scenario files: read TOML, validate every field against the registries, resolve to dataclasses.

Validation errors always name the file, the dotted field and what was expected, because the
person reading them is editing that file. Kind-specific parameters are checked against the
signature of the registered function (see ``testbed.scenario.registry``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from testbed.scenario import cadence as cadence_rule
from testbed.scenario.bounds import FLOAT32_MAX, representable
from testbed.scenario.compat import check_batch_keys
from testbed.scenario.errors import ScenarioError
from testbed.scenario.expect import validate_expect
from testbed.scenario.overrides import set_dotted
from testbed.scenario.readers import check_data_size, check_depth, check_name, read_toml, resolve_ranks
from testbed.scenario.registry import Registry, coerce
from testbed.scenario.schedule import SCHEDULE_KEYS, ScheduleSpec, read_schedule
from testbed.scenario.sweep import build_levels
from testbed.schema.run import DATA_CAUSES


@dataclass(frozen=True)
class Component:
    """A ``[model]``, ``[data]`` or ``[optim]`` table: a registered kind and its parameters."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PerturbationSpec:
    """One ``[[perturbations]]`` entry, ranks resolved to explicit integers."""

    kind: str
    ranks: tuple[int, ...]
    start_step: int = 0
    end_step: int | None = None  # exclusive; None = until the end
    params: dict[str, Any] = field(default_factory=dict)

    def active(self, rank: int, step: int) -> bool:
        in_window = self.start_step <= step and (self.end_step is None or step < self.end_step)
        return in_window and rank in self.ranks


@dataclass(frozen=True)
class MetricsSpec:
    """How often each instrument runs. 0 disables an instrument."""

    every: int = cadence_rule.EVERY  # per-rank loss / grad norm / cosine, gathered as scalars
    pairwise_every: int = cadence_rule.PAIRWISE_EVERY  # exact N×N cosine matrix (all-to-all path)
    weight_check_every: int = cadence_rule.WEIGHT_CHECK_EVERY  # cross-rank parameter checksum (scenario/cadence.py)
    noise_scale_ema: float = 0.9  # EMA factor for B_simple's numerator and denominator
    self_check: bool = False  # also all-gather full gradients and record brute-force values
    ledger_samples: int = 64  # the data ledger: sampled fingerprints per rank per step (0 = off; metrics/ledger.py)
    save_weights: bool = False  # each rank saves its final parameters to ranks/rank{r}.final.pt

    @property
    def cadence(self) -> cadence_rule.Cadence:
        """Which steps are measured, pairwise, state-checked (the runner's and the monitor's one rule)."""
        return cadence_rule.Cadence(self.every, self.pairwise_every, self.weight_check_every)


@dataclass(frozen=True)
class ParallelSpec:
    """``[parallel]``: how the model is data-parallel. ``ddp`` replicates it (DDP comm hook);
    ``fsdp2`` shards it with ``fully_shard``, one unit per layer, and measures in the
    reduce-scatter (engine/fsdp.py)."""

    kind: str = "ddp"  # ddp | fsdp2
    reshard_after_forward: bool = True  # fsdp2: free the gathered layer weights after forward
    broadcast_buffers: bool = True  # ddp: DDP(..., broadcast_buffers=...) - False leaves each rank's buffers its own


@dataclass(frozen=True)
class Scenario:
    """A fully validated, resolved scenario; ``to_dict`` round-trips through ``from_dict``."""

    name: str
    description: str
    world_size: int
    steps: int
    seed: int
    model: Component
    data: Component
    optim: Component
    batch_size: int
    backend: str = "auto"
    device: str = "cpu"
    grad_accum: int = 1
    threads_per_rank: int = 1
    timeout_s: float = 600.0
    stall_timeout_s: float = 120.0
    on_nonfinite: str = "continue"
    perturbations: tuple[PerturbationSpec, ...] = ()
    metrics: MetricsSpec = MetricsSpec()
    schedule: ScheduleSpec = ScheduleSpec()  # [optim] schedule / warmup_steps / warmup_ratio
    parallel: ParallelSpec = ParallelSpec()
    expect: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)
    intended: tuple[str, ...] = ()  # exact data causes on purpose (a replicate_batch baseline): not counted
    source: str = "<memory>"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Scenario":
        d = dict(d)
        d["model"], d["data"], d["optim"] = (Component(**d[k]) for k in ("model", "data", "optim"))
        d["perturbations"] = tuple(
            PerturbationSpec(**{**p, "ranks": tuple(p["ranks"])}) for p in d.get("perturbations", ())
        )
        d["metrics"] = MetricsSpec(**d.get("metrics", {}))
        d["schedule"] = ScheduleSpec(**d.get("schedule", {}))
        d["parallel"] = ParallelSpec(**d.get("parallel", {}))
        d["intended"] = tuple(d.get("intended", ()))
        return Scenario(**d)


_TOP_KEYS = {
    "name", "description", "world_size", "steps", "seed", "backend", "device", "grad_accum",
    "threads_per_rank", "timeout_s", "stall_timeout_s", "on_nonfinite", "model", "data", "optim",
    "perturbations", "metrics", "parallel", "expect", "sweep", "intended",
}
_BACKENDS = ("auto", "gloo", "nccl", "hccl")
# Bounds that keep a typo from becoming a memory blow-up or an overflow far from the file: ranks
# are materialised as a tuple, steps index an int64 progress counter, and timeouts become
# ``datetime.timedelta``s (which overflow near 1e14 s).
MAX_WORLD_SIZE = 4096
MAX_STEPS = 10**9
MAX_SECONDS = 10**7  # ~116 days
MAX_THREADS = 4096  # torch.set_num_threads(2**40) was "Overflow when unpacking long" inside every rank
_DEVICES = ("auto", "cpu", "cuda", "npu")
_PARALLEL_KINDS = ("ddp", "fsdp2")


def load_scenario(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """Read and validate a scenario file; ``overrides`` maps dotted keys to new values."""
    path = Path(path)
    raw = read_toml(path)
    for key, value in (overrides or {}).items():
        try:
            set_dotted(raw, key, value)
        except (LookupError, ValueError, TypeError, AttributeError):  # a path through a scalar, a bad index
            raise ScenarioError(path, key, "an override path that exists in the scenario "
                                "(tables by name, arrays by index, e.g. perturbations.0.ranks)", value) from None
    return parse_scenario(raw, source=str(path))


def parse_scenario(raw: Mapping[str, Any], source: str = "<memory>") -> Scenario:
    """Validate a scenario given as a dict (already parsed TOML)."""
    from testbed.scenario.tables import DATASETS, MODELS, OPTIMIZERS, PERTURBATIONS

    check_depth(raw, source)
    raw = copy.deepcopy(dict(raw))
    v = _Validator(source)
    v.no_unknown(raw, _TOP_KEYS, "")
    name = check_name(v.get(raw, "name", str), source)
    world_size, steps = _sizes(v, raw, source)
    model = v.component(raw, "model", MODELS)
    data_raw = raw.get("data")
    batch_size = v.get(data_raw if isinstance(data_raw, dict) else {}, "batch_size", int, where="data.")
    if batch_size < 1:
        raise ScenarioError(source, "data.batch_size", "an integer >= 1", batch_size)
    data = v.component(raw, "data", DATASETS, extra={"batch_size"})
    check_data_size(data, DATASETS, world_size, batch_size, source)
    optim = v.component(raw, "optim", OPTIMIZERS, extra=SCHEDULE_KEYS)
    schedule = read_schedule(raw["optim"], source, steps)
    metrics = v.metrics(raw.get("metrics", {}))
    parallel = v.parallel(raw.get("parallel", {}), raw.get("expect", {}))
    perturbations = tuple(
        v.perturbation(p, i, world_size, steps, PERTURBATIONS)
        for i, p in enumerate(v.list_of_tables(raw, "perturbations"))
    )
    check_batch_keys(model, data, perturbations, source)
    scenario = Scenario(
        name=name,
        description=v.get(raw, "description", str, default=""),
        world_size=world_size,
        steps=steps,
        seed=v.get(raw, "seed", int, default=0),
        model=model,
        data=data,
        optim=optim,
        batch_size=batch_size,
        backend=v.choice(raw, "backend", _BACKENDS, "auto"),
        device=v.choice(raw, "device", _DEVICES, "cpu"),
        grad_accum=v.positive(raw, "grad_accum", int, 1),
        threads_per_rank=v.positive(raw, "threads_per_rank", int, 1, upper=MAX_THREADS),
        timeout_s=v.positive(raw, "timeout_s", float, 600.0, upper=MAX_SECONDS),
        stall_timeout_s=v.positive(raw, "stall_timeout_s", float, 120.0, upper=MAX_SECONDS),
        on_nonfinite=v.choice(raw, "on_nonfinite", ("continue", "stop"), "continue"),
        perturbations=perturbations,
        metrics=metrics,
        schedule=schedule,
        parallel=parallel,
        expect=validate_expect(raw.get("expect", {}), source, steps=steps,
                               pairwise_every=metrics.pairwise_every,
                               weight_check_every=metrics.weight_check_every, has_sweep=bool(raw.get("sweep"))),
        sweep=v.get(raw, "sweep", dict, default={}),
        intended=v.intended(raw, perturbations),
        source=source,
    )
    if scenario.sweep:
        build_levels({**raw, "sweep": scenario.sweep}, source, parse_scenario)  # every level must be valid
    return scenario


def _sizes(v: "_Validator", raw: Mapping[str, Any], source: str) -> tuple[int, int]:
    """``world_size`` in 2..MAX_WORLD_SIZE and ``steps`` in 1..MAX_STEPS."""
    world_size = v.get(raw, "world_size", int)
    if world_size < 2:
        raise ScenarioError(source, "world_size", "an integer >= 2 (data parallelism needs two ranks)", world_size)
    if world_size > MAX_WORLD_SIZE:
        raise ScenarioError(source, "world_size", f"an integer <= {MAX_WORLD_SIZE}", world_size)
    steps = v.get(raw, "steps", int)
    if not 1 <= steps <= MAX_STEPS:
        raise ScenarioError(source, "steps", f"an integer in 1..{MAX_STEPS}", steps)
    return world_size, steps


class _Validator:
    """Field readers that raise ScenarioError with the file and the dotted field name."""

    def __init__(self, source: str):
        self.source = source

    def get(self, table: Mapping[str, Any], key: str, typ: Any, default: Any = ..., where: str = "") -> Any:
        if not isinstance(table, Mapping):
            raise ScenarioError(self.source, where.rstrip(".") or "<top>", "a table", table)
        if key not in table:
            if default is ...:
                raise ScenarioError(self.source, where + key, f"{_describe(typ)} (required)")
            return default
        try:
            return coerce(table[key], typ)
        except TypeError as e:
            raise ScenarioError(self.source, where + key, str(e), table[key]) from None

    def positive(self, table: Mapping[str, Any], key: str, typ: Any, default: Any, upper: float | None = None) -> Any:
        value = self.get(table, key, typ, default)
        what = _describe(typ).removeprefix("an ").removeprefix("a ")  # "a positive integer", one space
        if value <= 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ScenarioError(self.source, key, f"a positive {what}", value)
        if upper is not None and value > upper:
            raise ScenarioError(self.source, key, f"a positive {what} <= {upper:g}", value)
        return value

    def choice(self, table: Mapping[str, Any], key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(table, key, str, default)
        if value not in options:
            raise ScenarioError(self.source, key, "one of " + ", ".join(repr(o) for o in options), value)
        return value

    def no_unknown(self, table: Mapping[str, Any], known: set[str], where: str) -> None:
        for key in table:
            if key not in known:
                raise ScenarioError(
                    self.source, where + str(key), "no such field; known: " + ", ".join(sorted(known))
                )

    def list_of_tables(self, raw: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
        items = raw.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
            raise ScenarioError(self.source, key, "an array of tables ([[perturbations]])", items)
        return items

    def params(self, table: Mapping[str, Any], registry: Registry, kind: str, where: str,
               reserved: set[str]) -> dict[str, Any]:
        schema = registry.params(kind)
        out: dict[str, Any] = {}
        for key, value in table.items():
            if key in reserved:
                continue
            if key not in schema:
                known = sorted(set(schema) | reserved)
                raise ScenarioError(self.source, where + key,
                                    f"a parameter of {registry.what} kind {kind!r} (known: {', '.join(known)})")
            try:
                out[key] = coerce(value, schema[key].annotation)
            except TypeError as e:
                raise ScenarioError(self.source, where + key, str(e), value) from None
            if not representable(out[key]):  # NaN, Inf, 1e308: no float32 tensor op takes them
                raise ScenarioError(self.source, where + key,
                                    f"a finite number of magnitude <= {FLOAT32_MAX:.4g} (float32)", value)
        for pname, p in schema.items():
            if p.required and pname not in out:
                raise ScenarioError(self.source, where + pname, f"{_describe(p.annotation)} (required by {kind!r})")
        resolved = {**{k: p.default for k, p in schema.items() if not p.required}, **out}
        broken = registry.check(kind, resolved)
        if broken is not None:
            raise ScenarioError(self.source, where + broken[0], broken[1], resolved.get(broken[0], ...))
        return out

    def component(self, raw: Mapping[str, Any], key: str, registry: Registry,
                  extra: set[str] = frozenset()) -> Component:
        table = raw.get(key)
        if not isinstance(table, Mapping):
            raise ScenarioError(self.source, key, f"a [{key}] table with a 'kind'", table)
        kind = self.get(table, "kind", str, where=key + ".")
        if kind not in registry:
            raise ScenarioError(self.source, key + ".kind", "one of " + ", ".join(map(repr, registry.names())), kind)
        return Component(kind, self.params(table, registry, kind, key + ".", {"kind", *extra}))

    def metrics(self, table: Any) -> MetricsSpec:
        if not isinstance(table, Mapping):
            raise ScenarioError(self.source, "metrics", "a table", table)
        defaults = MetricsSpec()
        self.no_unknown(table, set(asdict(defaults)), "metrics.")
        values = {k: self.get(table, k, type(getattr(defaults, k)), getattr(defaults, k), where="metrics.")
                  for k in asdict(defaults)}
        for k in ("every", "pairwise_every", "weight_check_every"):
            if values[k] < 0:
                raise ScenarioError(self.source, "metrics." + k, "an integer >= 0 (0 = off)", values[k])
        if values["every"] == 0:
            raise ScenarioError(self.source, "metrics.every", "an integer >= 1", 0)
        if not 0 <= values["ledger_samples"] <= 4096:
            raise ScenarioError(self.source, "metrics.ledger_samples", "an integer in 0..4096 (0 = off)",
                                values["ledger_samples"])
        if not 0.0 <= values["noise_scale_ema"] < 1.0:
            raise ScenarioError(self.source, "metrics.noise_scale_ema", "a number in [0, 1)", values["noise_scale_ema"])
        return MetricsSpec(**values)

    def parallel(self, table: Any, expect: Any) -> ParallelSpec:
        if not isinstance(table, Mapping):
            raise ScenarioError(self.source, "parallel", "a table", table)
        self.no_unknown(table, set(asdict(ParallelSpec())), "parallel.")
        kind = self.get(table, "kind", str, "ddp", where="parallel.")
        if kind not in _PARALLEL_KINDS:
            raise ScenarioError(self.source, "parallel.kind", "one of " + ", ".join(map(repr, _PARALLEL_KINDS)), kind)
        reshard = self.get(table, "reshard_after_forward", bool, True, where="parallel.")
        broadcast = self.get(table, "broadcast_buffers", bool, True, where="parallel.")
        for key, applies in (("reshard_after_forward", "fsdp2"), ("broadcast_buffers", "ddp")):
            if key in table and kind != applies:
                raise ScenarioError(self.source, f"parallel.{key}", f"no such field for kind {kind!r} (it applies "
                                    f"to kind = {applies!r})", table[key])
        if kind == "fsdp2" and isinstance(expect, Mapping) and expect.get("weights_in_sync") is False:
            raise ScenarioError(self.source, "expect.weights_in_sync", "true or absent: under fsdp2 there are no "
                                "replicas to diverge (each rank holds a shard)", False)
        return ParallelSpec(kind, reshard, broadcast)

    def intended(self, raw: Mapping[str, Any], perturbations: tuple[PerturbationSpec, ...]) -> tuple[str, ...]:
        """``intended``: the data causes on purpose; by default "replicated" when a ``replicate_batch``
        baseline is among the perturbations (that kind exists to replicate on purpose)."""
        if "intended" not in raw:
            return ("replicated",) if any(p.kind == "replicate_batch" for p in perturbations) else ()
        value = raw["intended"]
        if not isinstance(value, list) or not all(isinstance(c, str) and c in DATA_CAUSES for c in value):
            raise ScenarioError(self.source, "intended", "a list of data causes on purpose, from "
                                + ", ".join(map(repr, DATA_CAUSES)), value)
        return tuple(dict.fromkeys(value))

    def perturbation(self, table: Mapping[str, Any], index: int, world_size: int, steps: int,
                     registry: Registry) -> PerturbationSpec:
        where = f"perturbations[{index}]."
        kind = self.get(table, "kind", str, where=where)
        if kind not in registry:
            raise ScenarioError(self.source, where + "kind", "one of " + ", ".join(map(repr, registry.names())), kind)
        ranks = resolve_ranks(table.get("ranks", "all"), world_size, self.source, where + "ranks")
        start = self.get(table, "start_step", int, 0, where=where)
        end = self.get(table, "end_step", int | None, None, where=where)
        if not 0 <= start < steps:  # a window that starts after the last step silently does nothing
            raise ScenarioError(self.source, where + "start_step", f"an integer in 0..{steps - 1} (steps = {steps})", start)
        if end is not None and end <= start:
            raise ScenarioError(self.source, where + "end_step", f"an integer > start_step ({start})", end)
        params = self.params(table, registry, kind, where, {"kind", "ranks", "start_step", "end_step"})
        return PerturbationSpec(kind, ranks, start, end, params)


def _describe(typ: Any) -> str:
    from testbed.scenario.registry import describe

    return describe(typ)
