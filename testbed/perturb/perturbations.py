"""Perturbations: small functions that edit one rank's plan for one step.

The worker builds a :class:`StepPlan` for every (rank, step) holding what a normal synchronous DP
step would do, then calls each *active* perturbation on it. A perturbation only ever edits the
plan, so it cannot reach into the training loop, and its effect window (``start_step`` /
``end_step``, ``ranks``) is enforced in one place. Register new kinds with
``@PERTURBATIONS.register("name")``; keyword-only parameters become the scenario's fields.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Mapping

import torch

from testbed.scenario.bounds import Bounds
from testbed.scenario.tables import PERTURBATIONS

Batch = dict[str, torch.Tensor]
BatchTransform = Callable[[Batch, torch.Generator], Batch]
GradTransform = Callable[[torch.Tensor, torch.Generator], None]


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class StepPlan:
    """What one rank does in one optimizer step. Defaults = a correctly synchronised DP step."""

    rank: int
    world_size: int
    step: int
    seed: int  # the scenario seed
    shuffle_seed: int  # seeds the epoch permutation; shared by all ranks in a synced job
    rng_seed: int  # seeds torch / numpy / random for this step (dropout masks, noise)
    data_rank: int  # whose shard of the permutation this rank reads
    lr_scale: float = 1.0
    autocast_dtype: torch.dtype | None = None
    delay_s: float = 0.0
    batch_transforms: list[BatchTransform] = field(default_factory=list)
    grad_transforms: list[GradTransform] = field(default_factory=list)
    before_step: list[Callable[[], None]] = field(default_factory=list)
    index_transforms: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    fixed_epoch: int | None = None  # the sampler's epoch stays here (set_epoch never called)
    num_shards: int | None = None  # the sampler's num_replicas (None: the world size; 1: no sharding)
    state_edits: list[Callable[[torch.nn.Module], None]] = field(default_factory=list)  # on the wrapped module

    @staticmethod
    def synced(rank: int, world_size: int, step: int, seed: int) -> "StepPlan":
        return StepPlan(
            rank=rank,
            world_size=world_size,
            step=step,
            seed=seed,
            shuffle_seed=derive_seed("shuffle", seed),
            rng_seed=derive_seed("rng", seed, step),
            data_rank=rank,
        )

    def generator(self, *salt: Any) -> torch.Generator:
        """A CPU generator private to this rank, step and purpose (for perturbation noise)."""
        return torch.Generator().manual_seed(derive_seed("perturb", self.seed, self.rank, self.step, *salt))


@PERTURBATIONS.register("shuffle_desync")
def shuffle_desync(plan: StepPlan, *, salt: int = 0) -> None:
    """The rank draws its epoch permutation from its own seed instead of the shared one.

    Its shard then overlaps the others' and some samples are skipped for the epoch: the
    reference study's data-shuffling desync (e.g. a sampler whose ``set_epoch`` or seed differs).
    """
    plan.shuffle_seed = derive_seed("shuffle-own", plan.seed, plan.rank, salt)


@PERTURBATIONS.register("seed_desync")
def seed_desync(plan: StepPlan, *, salt: int = 0) -> None:
    """The rank seeds torch / numpy / random with its own seed (different dropout masks, noise)."""
    plan.rng_seed = derive_seed("rng-own", plan.seed, plan.step, plan.rank, salt)


@PERTURBATIONS.register("replicate_batch")
def replicate_batch(plan: StepPlan, *, source_rank: int = 0) -> None:
    """The rank reads ``source_rank``'s shard, so (on all ranks) every rank sees the same batch.

    With all ranks affected this is the exact-zero control: identical inputs, identical seeds,
    hence identical local gradients, zero dispersion and cosine 1.
    """
    plan.data_rank = source_rank % plan.world_size


# --- the wider catalog: data skew, label noise, RNG drift, timing, silent corruption, mismatches ---


def _keep_in_groups(p: Mapping[str, Any]) -> tuple[str, str] | None:
    keep, groups = p["keep"], p["groups"]
    if not keep or any(not 0 <= k < groups for k in keep):
        return "keep", f"a non-empty list of groups in 0..{groups - 1} (groups = {groups})"
    return None


@PERTURBATIONS.register("shard_skew", check=_keep_in_groups)
def shard_skew(plan: StepPlan, *, groups: Annotated[int, Bounds(ge=1)], keep: list[int]) -> None:
    """Non-IID shard: the rank reads only samples of the groups in ``keep``.

    Works on datasets that lay groups out cyclically, record ``i`` in group ``i % groups`` (the
    task types of ``alpaca_synthetic``; its ``info['groups']``). Each index the sampler hands the
    rank that falls outside ``keep`` is moved, deterministically, to a record of a kept group in
    the same or the previous block of ``groups`` records (so it stays inside the dataset). On a
    dataset without that layout it still narrows the rank to a fixed subset of records.
    """
    if groups < 1 or not keep or any(not 0 <= k < groups for k in keep):
        raise ValueError(f"shard_skew needs groups >= 1 and keep a non-empty list of groups in 0..{groups - 1}, "
                         f"got groups={groups}, keep={keep}")
    kept = torch.tensor(sorted(set(keep)), dtype=torch.long)

    def skew(idx: torch.Tensor) -> torch.Tensor:
        position = idx % groups
        base = idx - position
        target = kept[(idx // groups) % len(kept)]
        step_back = (target > position) & (base >= groups)  # never past the dataset's end
        moved = base + target - groups * step_back.long()
        return torch.where(torch.isin(position, kept), idx, moved)

    plan.index_transforms.append(skew)


@PERTURBATIONS.register("label_noise")
def label_noise(plan: StepPlan, *, fraction: Annotated[float, Bounds(ge=0, le=1)] = 0.2, key: str = "targets",
                mask_key: str = "loss_mask") -> None:
    """A ``fraction`` of the rank's targets are redrawn at random from the batch's own targets.

    Drawing from the batch's targets (its empirical label distribution) needs no class count and
    works for class labels and token targets alike; where the batch has ``mask_key`` only targets
    that count towards the loss are touched and drawn from. A redraw can land on the original.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_noise fraction must be in [0, 1], got {fraction}")

    def redraw(batch: Batch, generator: torch.Generator) -> Batch:
        targets = batch[key].clone()
        flat = targets.view(-1)
        eligible = batch[mask_key].reshape(-1).bool() if mask_key in batch else torch.ones_like(flat, dtype=torch.bool)
        pool = flat[eligible]
        chosen = (torch.rand(flat.shape, generator=generator) < fraction) & eligible
        if pool.numel() and chosen.any():
            picks = torch.randint(pool.numel(), (int(chosen.sum()),), generator=generator)
            flat[chosen] = pool[picks]
        return {**batch, key: targets}

    plan.batch_transforms.append(redraw)


@PERTURBATIONS.register("dropout_desync",
                        check=lambda p: ("offset", "a non-zero integer (0 changes nothing)") if p["offset"] == 0 else None)
def dropout_desync(plan: StepPlan, *, offset: int = 1) -> None:
    """RNG drift: the rank's per-step random stream (its dropout masks) runs ``offset`` steps off.

    Data, shuffle and everything else stay synced. Unlike ``seed_desync`` (a private seed per
    rank: every perturbed rank differs from every other), the drifted rank reuses the *shared*
    stream of step ``step + offset`` — the bug of a rank that drew extra random numbers (an extra
    dropout-on forward for logging, say). Ranks drifted by the same offset agree with one another,
    so the disagreement is between two groups, visible as blocks in the pairwise cosine matrix.
    """
    if offset == 0:
        raise ValueError("dropout_desync offset 0 changes nothing; use a non-zero offset")
    plan.rng_seed = StepPlan.synced(plan.rank, plan.world_size, plan.step + offset, plan.seed).rng_seed


@PERTURBATIONS.register("straggler")
def straggler(plan: StepPlan, *, delay_s: Annotated[float, Bounds(ge=0, le=10**7)] = 0.2) -> None:
    """The rank arrives ``delay_s`` late to the gradient all-reduce: timing changes, numerics must not."""
    if delay_s < 0:
        raise ValueError(f"straggler delay_s must be >= 0, got {delay_s}")
    plan.delay_s += delay_s


@PERTURBATIONS.register("grad_corruption")
def grad_corruption(plan: StepPlan, *, mode: Literal["bitflip", "scale", "noise"] = "scale", factor: float = 1000.0,
                    bit: Annotated[int, Bounds(ge=0, le=63)] = 30, count: Annotated[int, Bounds(ge=1)] = 1) -> None:
    """Silent data corruption of the rank's local gradient bucket before the all-reduce.

    ``scale``: every bucket times ``factor``. ``noise``: Gaussian noise of std ``factor`` × the
    bucket's RMS added to every bucket. ``bitflip``: bit ``bit`` of ``count`` random elements of
    the first bucket flipped (bit 30 of a float32 is the top exponent bit: a value ~1e-3 becomes
    ~1e35). Limit it to one step with ``start_step = S``, ``end_step = S + 1``.
    """
    if count < 1:
        raise ValueError(f"grad_corruption count must be >= 1, got {count}")
    flipped = [False]  # bitflip hits the first bucket of the step only

    def corrupt(bucket: torch.Tensor, generator: torch.Generator) -> None:
        if mode == "scale":
            bucket.mul_(factor)
        elif mode == "noise":
            rms = bucket.float().norm() / max(bucket.numel(), 1) ** 0.5
            noise = torch.randn(bucket.shape, generator=generator).to(bucket.device, bucket.dtype)
            bucket.add_(noise * (factor * rms).to(bucket.dtype))
        elif not flipped[0]:
            flipped[0] = True
            _flip_bits(bucket, generator, bit, count)

    plan.grad_transforms.append(corrupt)


def _flip_bits(bucket: torch.Tensor, generator: torch.Generator, bit: int, count: int) -> None:
    bits = bucket.element_size() * 8
    if not 0 <= bit < bits:
        raise ValueError(f"grad_corruption bit must be in 0..{bits - 1} for {bucket.dtype}, got {bit}")
    ints = bucket.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[bucket.element_size()])
    where = torch.randint(bucket.numel(), (count,), generator=generator).to(bucket.device)
    mask = -(1 << bit) if bit == bits - 1 else 1 << bit  # the sign bit as a signed integer
    ints[where] = torch.bitwise_xor(ints[where], mask)


@PERTURBATIONS.register("lr_mismatch")
def lr_mismatch(plan: StepPlan, *, scale: Annotated[float, Bounds(ge=0)] = 2.0) -> None:
    """The rank's optimizer uses ``scale`` × the learning rate: identical averaged gradients, yet
    its update differs, so its weights leave the others' at the first affected step."""
    if scale < 0:
        raise ValueError(f"lr_mismatch scale must be >= 0, got {scale}")
    plan.lr_scale *= scale


@PERTURBATIONS.register("precision_mismatch")
def precision_mismatch(plan: StepPlan, *, dtype: Literal["bfloat16", "float16"] = "bfloat16") -> None:
    """The rank runs its forward pass under autocast in ``dtype`` while the others stay in float32.

    Its local loss and gradient differ (dispersion, lower cosine); DDP still averages one gradient
    for everyone, so weights stay in sync unless something downstream of the all-reduce differs.
    """
    plan.autocast_dtype = getattr(torch, dtype)


label_noise.batch_key_params = ("key",)  # type: ignore[attr-defined]  # must name a key of the batch (scenario/compat.py)
