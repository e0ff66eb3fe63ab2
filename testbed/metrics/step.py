"""Pure metric math (no torch.distributed here, so every line is testable without processes).

Contract: ``shared/METRICS.md``. Inputs per step are per-rank scalars that the comm hook
accumulates bucket by bucket — the local loss, ``‖g_i‖²`` and ``g_i·ḡ`` — and, every k steps, the
Gram matrix ``G_ij = g_i·g_j``. Everything else is derived from those, e.g. ``‖ḡ‖² = mean_i g_i·ḡ``.

Degenerate cases never produce a silently wrong number; they produce ``None`` (JSON null) and
a flag ``{"rank": r, "kind": ...}`` in the row:
- non-finite loss or gradient on a rank → ``nonfinite_loss`` / ``nonfinite_grad``; every
  aggregate that would include that rank is None.
- zero local gradient on a rank → ``zero_grad``; its cosine is None and ``cos_mean``/``cos_min``
  are taken over the ranks whose cosine is defined (None if none is).
- zero mean gradient (ranks cancel exactly) → ``zero_mean_grad``; every cosine is None.
- zero mean (loss or grad norm) with non-zero spread → CV None, flag ``zero_mean_loss`` /
  ``zero_mean_grad_norm``; zero spread with zero mean → CV 0.
- world size 1 → std 0, CV 0, cosine 1 (the mean gradient *is* the local gradient).
Cosines are clamped to [-1, 1] to remove round-off excursions (≤ a few ulp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from testbed.schema import row as R
from testbed.schema.row import Flag, Row

GRAM_CHUNK = 1 << 18  # elements per rank per dot-product / Gram chunk (see BucketAccumulator.add_gram)
GRAM_BLOCK = 1 << 12  # columns per fp32 block product inside a Gram chunk, summed in float64


class BucketAccumulator:
    """Accumulates one rank's ``‖g‖²`` and ``g·ḡ`` (and optionally its share of ``G``) over
    gradient buckets.

    Sums over buckets equal the whole-vector values for any partition of the flat gradient, which
    is what lets the DDP comm hook compute them without ever materialising the full gradient.
    Values stay on the gradient's device in float64 until the step's one gather.

    ``gram`` is this rank's *share* of the Gram matrix: ``Σ g_i[k]·g_j[k]`` over the positions k
    this rank reduced (the all-to-all path gives rank k every rank's slice k). The full ``G`` is
    the sum of the shares over ranks; buckets measured this way add nothing to ``sq_norm`` and
    ``dot_with_mean`` (``gram_scalars`` derives them). It is created by ``with_gram`` or by the
    first ``add_slices``, never bigger than N×N.
    """

    def __init__(self, world_size: int = 1, device: torch.device | str = "cpu", with_gram: bool = False):
        self.world_size, self.device = world_size, device
        self.sq_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.dot_with_mean = torch.zeros((), dtype=torch.float64, device=device)
        self.gram = torch.zeros((world_size, world_size), dtype=torch.float64, device=device) if with_gram else None

    def add_local(self, local: torch.Tensor) -> None:
        self.sq_norm += torch.stack([torch.dot(x, x) for x in _chunks([local])]).double().sum()

    def add_dot(self, local: torch.Tensor, mean: torch.Tensor) -> None:
        dots = [torch.dot(x, y) for x, y in zip(_chunks([local]), _chunks([mean]))]
        self.dot_with_mean += torch.stack(dots).double().sum()

    def add_pairs(self, locals_: Sequence[torch.Tensor], means: Sequence[torch.Tensor]) -> None:
        """``‖g‖²`` and ``g·ḡ`` over matching pieces (e.g. each parameter's local gradient and its
        view into the averaged bucket) in one pass: each chunk of the local gradient is read for
        its square and, while still in cache, for its dot with the mean; the per-chunk fp32 sums
        are added in float64, so both values stay within ~1e-6 relative of float64 at any size
        (one fp32 dot over 10M elements drifts ~1e-4). Two accumulator updates per call."""
        squares, dots = [], []
        for x, y in zip(_chunks(locals_), _chunks(means)):
            squares.append(torch.dot(x, x))
            dots.append(torch.dot(x, y))
        if squares:
            self.sq_norm += torch.stack(squares).double().sum()
            self.dot_with_mean += torch.stack(dots).double().sum()

    def add_slices(self, rows: torch.Tensor, out: torch.Tensor, divide: int = 1) -> None:
        """``rows``: [N, s] — every rank's copy of the same slice of the gradient (what an
        all-to-all delivers). Adds those positions' share of ``G`` and writes
        ``Σ_i rows[i] / divide`` into ``out`` (row by row, in at least fp32, rounded once to
        ``out``'s dtype): the slice of the reduced gradient. Exact w.r.t. the unrounded mean."""
        if self.gram is None:
            self.gram = torch.zeros((self.world_size, self.world_size), dtype=torch.float64, device=self.device)
        self.add_gram(rows)
        wide = out.dtype in (torch.float32, torch.float64)
        total = out if wide else torch.empty(out.shape, dtype=torch.float32, device=out.device)
        # Row by row (a strided sum over dim 0 is ~2x slower on CPU). Narrow rows are added into the
        # fp32 buffer one at a time: torch.add(bf16, bf16, out=fp32) would round in bf16 first.
        if rows.shape[0] == 1 or not wide:
            total.copy_(rows[0])
            for row in rows[1:]:
                total.add_(row)
        else:
            torch.add(rows[0], rows[1], out=total)
            for row in rows[2:]:
                total.add_(row)
        if divide != 1:
            total.div_(divide)
        if not wide:
            out.copy_(total)

    def add_gram(self, rows: torch.Tensor) -> None:
        """``rows``: [N, n] — every rank's values at the same n positions; adds their Gram.

        Works through column chunks of ``GRAM_CHUNK`` elements (narrower dtypes are upcast one
        chunk at a time, so the extra memory is N × GRAM_CHUNK × 4 bytes, never N × bucket); each
        chunk is one batched matmul over blocks of ``GRAM_BLOCK`` columns whose [N, N] products
        are summed in float64. One fp32 matmul over 262,144 columns drifts ~1e-5 relative on
        heavy-tailed values; 4,096-column blocks keep it ~1e-7 at ~the same speed (benchmarks/).
        """
        assert self.gram is not None, "accumulator built without with_gram"
        g = rows.reshape(rows.shape[0], -1)
        n = g.shape[0]
        for chunk in g.split(GRAM_CHUNK, dim=1):
            c = chunk if chunk.dtype in (torch.float32, torch.float64) else chunk.float()
            k = c.shape[1] // GRAM_BLOCK
            if k:  # [k, N, BLOCK] views (no copy) → [k, N, N] products
                blocks = c[:, :k * GRAM_BLOCK].reshape(n, k, GRAM_BLOCK).transpose(0, 1)
                self.gram += torch.bmm(blocks, blocks.transpose(1, 2)).double().sum(dim=0)
            tail = c[:, k * GRAM_BLOCK:]
            if tail.shape[1]:
                self.gram += (tail @ tail.T).double()


def gram_scalars(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``‖g_i‖²`` and ``g_i·ḡ`` over the positions a Gram matrix covers: ``G_ii``
    and ``(1/N) Σ_j G_ij`` (since ``ḡ = (1/N) Σ_j g_j``). No rounded mean gradient enters."""
    g = np.asarray(gram, dtype=np.float64)
    return np.diag(g).copy(), g.sum(axis=1) / g.shape[0]


def _as_float(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _chunks(tensors: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Flat float chunks of ``GRAM_CHUNK`` elements, lazily (views for fp32/fp64; narrower dtypes
    are upcast one chunk at a time, never a whole bucket)."""
    return (_as_float(c) for t in tensors for c in t.reshape(-1).split(GRAM_CHUNK))


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


def _flag(rank: int | None, kind: str) -> Flag:
    return {R.FLAG_RANK: rank, R.FLAG_KIND: kind}  # type: ignore[misc]


def _spread(values: Sequence[float], flag_kind: str, flags: list[Flag]) -> tuple[float | None, float | None]:
    """Population std and CV (std / |mean|) of finite values; None if any value is non-finite."""
    if not all(_finite(v) for v in values):
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    # Deviations from the first value: identical values give exactly 0 (np.std([x]*3) need not),
    # and the shift removes the cancellation of a large common offset.
    dev = arr - arr[0]
    shift = float(dev.mean())
    mean = float(arr[0]) + shift
    std = float(np.sqrt(np.mean((dev - shift) ** 2)))
    if mean == 0.0:
        if std == 0.0:
            return std, 0.0
        flags.append(_flag(None, flag_kind))
        return std, None
    return std, std / abs(mean)


def step_metrics(losses: Sequence[float], sq_norms: Sequence[float], dots_with_mean: Sequence[float]) -> Row:
    """The per-step record from per-rank scalars (see module docstring for degenerate cases)."""
    n = len(losses)
    if not (n == len(sq_norms) == len(dots_with_mean)) or n == 0:
        raise ValueError("losses, sq_norms and dots_with_mean need one entry per rank")
    flags: list[Flag] = []
    losses = [float(x) for x in losses]
    sq = [float(x) for x in sq_norms]
    dots = [float(x) for x in dots_with_mean]
    # One non-finite local gradient makes ḡ, hence every rank's g_i·ḡ, non-finite: blame only the
    # ranks whose own ‖g_i‖² is non-finite, unless all are finite (then the dot itself overflowed).
    local_grads_finite = all(_finite(s) for s in sq)
    for r in range(n):
        if not _finite(losses[r]):
            flags.append(_flag(r, R.NONFINITE_LOSS))
        if not _finite(sq[r]) or (local_grads_finite and not _finite(dots[r])):
            flags.append(_flag(r, R.NONFINITE_GRAD))
    finite_losses = all(_finite(x) for x in losses)
    global_loss = float(np.mean(losses)) if finite_losses else None
    loss_std, loss_cv = _spread(losses, R.ZERO_MEAN_LOSS, flags)
    grad_ok = all(_finite(a) and _finite(b) for a, b in zip(sq, dots))
    norms = [math.sqrt(max(s, 0.0)) if _finite(s) else None for s in sq]
    if grad_ok:
        grad_norm_std, grad_norm_cv = _spread(norms, R.ZERO_MEAN_GRAD_NORM, flags)
        mean_sq = max(float(np.mean(dots)), 0.0)  # ‖ḡ‖² = mean_i g_i·ḡ
        cos = _cosines(norms, dots, mean_sq, flags)
    else:
        grad_norm_std = grad_norm_cv = mean_sq = None
        cos = [None] * n
    defined = [c for c in cos if c is not None]
    return {  # type: ignore[misc]  (the schema's constants are the TypedDict's keys)
        R.LOSS: losses if finite_losses else [x if _finite(x) else None for x in losses],
        R.GLOBAL_LOSS: global_loss,
        R.LOSS_STD: loss_std,
        R.LOSS_CV: loss_cv,
        R.GRAD_NORM: norms,
        R.GRAD_NORM_STD: grad_norm_std,
        R.GRAD_NORM_CV: grad_norm_cv,
        R.MEAN_GRAD_NORM: math.sqrt(mean_sq) if mean_sq is not None else None,
        R.COS_TO_MEAN: cos,
        R.COS_MEAN: float(np.mean(defined)) if defined else None,
        R.COS_MIN: float(min(defined)) if defined else None,
        R.FLAGS: flags,
    }


def _cosines(norms: list[float], dots: list[float], mean_sq: float, flags: list[Flag]) -> list[float | None]:
    mean_norm = math.sqrt(mean_sq)
    if mean_norm == 0.0:
        flags.append(_flag(None, R.ZERO_MEAN_GRAD))
        return [None] * len(norms)
    out: list[float | None] = []
    for r, (norm, dot) in enumerate(zip(norms, dots)):
        if norm == 0.0:
            flags.append(_flag(r, R.ZERO_GRAD))
            out.append(None)
        else:
            out.append(min(1.0, max(-1.0, dot / (norm * mean_norm))))
    return out


def pairwise_cosine(gram: np.ndarray) -> list[list[float | None]]:
    """N×N cosine matrix from the Gram matrix; rows/cols of zero-norm ranks are None."""
    g = np.asarray(gram, dtype=np.float64)
    g = (g + g.T) / 2  # a float32 matmul can round G_ij and G_ji differently; cos(i, j) is one number
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    n = g.shape[0]
    out: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if norms[i] > 0 and norms[j] > 0 and np.isfinite(g[i, j]):
                out[i][j] = float(np.clip(g[i, j] / (norms[i] * norms[j]), -1.0, 1.0))
    return out


def mean_offdiagonal(matrix: list[list[float | None]]) -> float | None:
    """Mean of the defined off-diagonal entries (None for N = 1 or when none is defined)."""
    vals = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v is not None]
    return float(np.mean(vals)) if vals else None


def noise_scale_terms(sq_norms: Sequence[float], mean_sq: float, batch_per_rank: int) -> tuple[float, float] | None:
    """Unbiased ``|G|²`` and ``tr(Σ)`` estimates (McCandlish et al. 2018, appendix A.1).

    B_small = b (one rank), B_big = N·b (the all-reduced mean). None for N = 1 (no second size).
    """
    n = len(sq_norms)
    if n < 2 or not all(_finite(s) for s in sq_norms) or not _finite(mean_sq):
        return None
    b_small, b_big = float(batch_per_rank), float(n * batch_per_rank)
    g_small = float(np.mean(sq_norms))
    g2 = (b_big * mean_sq - b_small * g_small) / (b_big - b_small)
    tr_sigma = (g_small - mean_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr_sigma


@dataclass
class NoiseScaleEMA:
    """B_simple = EMA(tr Σ) / EMA(|G|²): both averaged separately, as the paper recommends."""

    decay: float = 0.9
    g2: float | None = field(default=None)
    tr_sigma: float | None = field(default=None)

    def update(self, terms: tuple[float, float] | None) -> float | None:
        if terms is None:
            return self.value()
        g2, tr = terms
        if self.g2 is None or self.tr_sigma is None:
            self.g2, self.tr_sigma = g2, tr
        else:
            self.g2 = self.decay * self.g2 + (1 - self.decay) * g2
            self.tr_sigma = self.decay * self.tr_sigma + (1 - self.decay) * tr
        return self.value()

    def value(self) -> float | None:
        if self.g2 is None or self.tr_sigma is None or self.g2 <= 0:
            return None
        return self.tr_sigma / self.g2


def brute_force(grads: np.ndarray) -> dict[str, Any]:
    """Direct formulas on full per-rank gradients [N, D] (float64): the oracle for self-checks.

    Deliberately shares no code with ``step_metrics`` so that comparing the two tests the
    bucketed, hook-based path end to end.
    """
    g = np.asarray(grads, dtype=np.float64).reshape(grads.shape[0], -1)
    norms = np.linalg.norm(g, axis=1)
    mean = g.mean(axis=0)
    mean_norm = np.linalg.norm(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = (g @ mean) / (norms * mean_norm)
        pair = (g @ g.T) / np.outer(norms, norms)
    return {
        R.GRAD_NORM: norms.tolist(),
        R.MEAN_GRAD_NORM: float(mean_norm),
        R.COS_TO_MEAN: cos.tolist(),
        R.PAIRWISE_COS: pair.tolist(),
    }
