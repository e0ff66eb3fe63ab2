"""Expected device memory per rank for DDP full fine-tuning of an ``hf`` model (an estimate).

Model states, exact given the parameter count P:
- weights: P × (4 B for fp32 / bf16-mixed, 2 B for bf16)
- gradients: the same again, and DDP's flat gradient buckets once more (the default
  ``gradient_as_bucket_view=False`` keeps bucket copies next to ``param.grad``)
- optimizer: AdamW keeps 2 states per parameter in the parameter dtype; SGD with momentum 1; else 0.

Activations, rough (needs ``config.json`` for the shape): per micro-batch of b sequences of s
tokens, every decoder layer keeps about ``(6h + 2·kv + 4·I) · b·s`` values (norm inputs,
q/k/v/o, the MLP's gate/up/product) in the activation dtype, or only its ``h · b·s`` input with
gradient checkpointing (plus one layer recomputed); the LM head keeps ``b·s·V`` logits plus an
fp32 copy and its gradient for the loss. Attention scores are not counted (SDPA / flash kernels
do not keep them). Not included: the framework and allocator overhead, the communication
library's buffers, the comm hook's extra bucket on pairwise steps. Treat the total as a lower
bound and leave 20-30 % headroom.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.scenario.spec import Scenario

GIB = 1024**3


@dataclass
class MemoryEstimate:
    params: int
    params_source: str
    weights: int
    gradients: int
    ddp_buckets: int
    optimizer: int
    activations: int | None
    activations_note: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.ddp_buckets + self.optimizer + (self.activations or 0)

    def lines(self) -> list[str]:
        gib = lambda n: f"{n / GIB:7.2f} GiB"  # noqa: E731
        out = [f"parameters      {self.params:,} ({self.params_source})",
               f"weights         {gib(self.weights)}",
               f"gradients       {gib(self.gradients)}",
               f"DDP buckets     {gib(self.ddp_buckets)}",
               f"optimizer       {gib(self.optimizer)}"]
        out.append(f"activations     {gib(self.activations)}  ({self.activations_note})" if self.activations is not None
                   else f"activations         n/a   ({self.activations_note})")
        out.append(f"total           {gib(self.total)}  per rank (estimate; lower bound, see testbed/engine/memory.py)")
        return out


def estimate(scenario: Scenario) -> MemoryEstimate | None:
    """The estimate for an ``hf`` model, or None for other kinds / when P cannot be known."""
    if scenario.model.kind != "hf":
        return None
    params = scenario.model.params
    config, count, source = _shape(params)
    if count is None:
        return None
    precision = params.get("dtype", "fp32")
    state_bytes = 2 if precision == "bf16" else 4
    opt = scenario.optim
    states = 2 if opt.kind == "adamw" else (1 if opt.kind == "sgd" and opt.params.get("momentum", 0.0) else 0)
    acts, note = _activations(config, scenario, precision)
    return MemoryEstimate(count, source, count * state_bytes, count * state_bytes, count * state_bytes,
                          states * count * state_bytes, acts, note)


def _shape(params: dict[str, Any]) -> tuple[dict[str, Any] | None, int | None, str]:
    path = Path(params["path"])
    if (path / "config.json").is_file():
        from testbed.workloads.hf import count_parameters, read_config

        try:
            return read_config(path), count_parameters(path), f"counted from {path}/config.json"
        except Exception as exc:  # noqa: BLE001 — a plan must still print; say why the count is missing
            return None, None, f"cannot count from {path}: {type(exc).__name__}: {exc}"
    hint = float(params.get("params_b_hint", 0.0))
    if hint > 0:
        return None, round(hint * 1e9), f"params_b_hint; {path} not on this machine"
    return None, None, f"{path} not on this machine and no params_b_hint"


def _activations(config: dict[str, Any] | None, scenario: Scenario, precision: str) -> tuple[int | None, str]:
    if config is None:
        return None, "needs the checkpoint's config.json"
    seq = scenario.data.params.get("max_len", 1024)
    tokens = scenario.batch_size * seq
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads) * config.get("head_dim", h // heads)
    inter = config["intermediate_size"]
    act = 4 if precision == "fp32" else 2
    per_layer = (6 * h + 2 * kv + 4 * inter) * tokens * act
    checkpointing = bool(scenario.model.params.get("gradient_checkpointing", False))
    body = (layers * h * tokens * act + per_layer) if checkpointing else layers * per_layer
    head = tokens * vocab * (act + 4 + 4)
    mode = "with gradient checkpointing" if checkpointing else "no checkpointing"
    return body + head, f"micro-batch {scenario.batch_size} × {seq} tokens, {mode}"


# ---- sizes that cannot exist on this machine (refused before launch) -----------------------------

def total_memory_bytes() -> int | None:
    """MemTotal + SwapTotal from /proc/meminfo (Linux); None elsewhere (nothing is refused then)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal") if k in fields)
    except (OSError, ValueError):
        return None


def component_bytes(scenario: Scenario) -> list[tuple[str, int, str]]:
    """``(field, bytes per rank, how)`` for what a rank of this scenario holds that its settings
    decide: the dataset (built whole in every rank) and the model's states (weights, gradients,
    DDP buckets, optimizer states; float32). Only kinds that declare their sizes
    (``memory_bytes`` on a dataset, ``parameter_count`` on a model) are counted."""
    from testbed.scenario.tables import DATASETS, MODELS

    out = []
    dataset = DATASETS.get(scenario.data.kind)
    if callable(size := getattr(dataset, "memory_bytes", None)):
        out.append(("data.size", int(size(scenario.data.params)), f"[data] kind {scenario.data.kind!r}"))
    model = MODELS.get(scenario.model.kind)
    if callable(count := getattr(model, "parameter_count", None)):
        params = int(count(scenario.model.params, scenario.data.params))
        opt = scenario.optim
        states = 2 if opt.kind == "adamw" else (1 if opt.params.get("momentum", 0.0) else 0)
        field = f"model.{getattr(model, 'size_field', 'kind')}"
        out.append((field, params * 4 * (3 + states), f"{params:,} parameters × 4 B × {3 + states} copies"))
    return out


def check_fits(scenario: Scenario) -> None:
    """ScenarioError if the ranks' datasets and model states together exceed this machine's memory
    and swap: such a run can only end in the OOM killer (``data.size = 1e10`` asked 320 GB)."""
    from testbed.scenario.errors import ScenarioError

    total = total_memory_bytes()
    parts = component_bytes(scenario)
    if total is None or not parts:
        return
    ranks = scenario.world_size if scenario.device in ("cpu", "auto") else 1
    need = ranks * sum(b for _, b, _ in parts)
    if need > total:
        field, biggest, how = max(parts, key=lambda p: p[1])
        raise ScenarioError(scenario.source, field, f"a size this machine can hold: {how} needs {biggest / GIB:.3g} GiB "
                            f"per rank, {need / GIB:.3g} GiB for {ranks} rank(s) in all, but memory + swap here is "
                            f"{total / GIB:.3g} GiB", scenario.data.params.get("size") if field == "data.size" else
                            scenario.model.params.get(field.split(".", 1)[1]))
