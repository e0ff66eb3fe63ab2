"""Hypothesis strategies for the invariant suite: per-rank losses and gradients, world sizes,
bucket partitions, and the tolerances that go with them.

Small and composable on purpose, so that another data-parallel stack can lift them: nothing here
imports the testbed. Gradients are drawn as a parameter list (varied shapes) flattened into one
vector per rank, in float32 or float64, and each rank is scaled by its own power of two, so that
scales differ by up to 2^40 between ranks while the scaling itself is exact (no rounding).
Entries are 0 or have magnitude in [2^-10, 1] before scaling: squares neither underflow nor
overflow in float32, so the only error left is the rounding the tolerances below account for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

DTYPES: tuple[type, ...] = (np.float32, np.float64)
MAX_SCALE_EXP = 20  # per-rank scale 2^k, |k| <= MAX_SCALE_EXP


def world_sizes(min_size: int = 1, max_size: int = 16) -> st.SearchStrategy[int]:
    return st.integers(min_size, max_size)


def dtypes() -> st.SearchStrategy[type]:
    return st.sampled_from(DTYPES)


def entries(dtype: type) -> st.SearchStrategy[float]:
    """Raw gradient entries in [-1, 1], representable in ``dtype`` (snapped by ``_snap``)."""
    return st.floats(-1.0, 1.0, width=32 if dtype == np.float32 else 64)


def _snap(a: np.ndarray) -> np.ndarray:
    """Entries below 2^-10 in magnitude become 0, so scaled squares stay normal floats."""
    return np.where(np.abs(a) < 2.0**-10, 0, a).astype(a.dtype)


def param_shapes(max_params: int = 4) -> st.SearchStrategy[list[tuple[int, ...]]]:
    """A model's parameter shapes (vectors, matrices, 3-d kernels): 1 to 64 numbers in all."""
    shape = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
    return st.lists(shape, min_size=1, max_size=max_params).filter(lambda s: _numel(s) <= 64)


def _numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


@dataclass(frozen=True)
class GradCase:
    """Every rank's local gradient, flattened: ``grads[r]`` is rank r's ``g_r`` (dtype as drawn)."""

    grads: np.ndarray  # [N, D]
    shapes: tuple[tuple[int, ...], ...]  # parameter shapes; their sizes add up to D

    @property
    def world_size(self) -> int:
        return self.grads.shape[0]

    @property
    def dim(self) -> int:
        return self.grads.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.grads.dtype

    def params(self, rank: int) -> list[np.ndarray]:
        """Rank ``rank``'s gradient split back into its parameter tensors."""
        out, start = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(self.grads[rank, start:start + n].reshape(shape))
            start += n
        return out


@st.composite
def gradient_cases(draw: st.DrawFn, world_size: st.SearchStrategy[int] | None = None,
                   dtype: st.SearchStrategy[type] | None = None, nonzero: bool = True) -> GradCase:
    """Per-rank gradients of drawn shapes, dtype and per-rank scales.

    ``nonzero``: every rank keeps at least one non-zero entry (so its cosine is defined); zero
    gradients are a degenerate case with tests of their own.
    """
    n = draw(world_size if world_size is not None else world_sizes())
    dt = draw(dtype if dtype is not None else dtypes())
    shapes = tuple(draw(param_shapes()))
    d = _numel(list(shapes))
    grads = _snap(draw(hnp.arrays(dt, (n, d), elements=entries(dt))))
    if nonzero:
        for r in range(n):
            if not grads[r].any():
                grads[r, draw(st.integers(0, d - 1))] = draw(st.sampled_from([1.0, -1.0, 0.5, -0.75]))
    exps = draw(st.lists(st.integers(-MAX_SCALE_EXP, MAX_SCALE_EXP), min_size=n, max_size=n))
    scales = (2.0 ** np.asarray(exps, dtype=np.float64)).astype(dt)
    return GradCase(grads * scales[:, None], shapes)


@st.composite
def identical_gradient_cases(draw: st.DrawFn, world_size: st.SearchStrategy[int] | None = None) -> GradCase:
    """The same non-zero gradient on every rank (the replicated-batch control, in pure math)."""
    one = draw(gradient_cases(world_size=st.just(1)))
    n = draw(world_size if world_size is not None else world_sizes())
    return GradCase(np.repeat(one.grads, n, axis=0), one.shapes)


def rank_losses(n: int, max_abs: float = 1e4) -> st.SearchStrategy[list[float]]:
    """``n`` finite per-rank losses (any sign: the metric must not assume a positive loss).

    Magnitudes below 1e-100 become 0: the square of a smaller deviation underflows float64, a
    limit of every floating-point std, not of this metric (real losses live far above it).
    """
    value = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    return st.lists(value.map(lambda x: x if abs(x) >= 1e-100 else 0.0), min_size=n, max_size=n)


def partitions(length: int, max_buckets: int = 8) -> st.SearchStrategy[list[slice]]:
    """Any split of ``range(length)`` into contiguous non-empty buckets, in order.

    DDP's buckets follow parameter boundaries, but the per-bucket sums must equal the
    whole-vector values for *every* partition, so the cuts are drawn anywhere.
    """
    if length <= 1:
        return st.just([slice(0, length)])
    cuts = st.sets(st.integers(1, length - 1), max_size=min(max_buckets - 1, length - 1))
    return cuts.map(lambda c: [slice(a, b) for a, b in zip([0, *sorted(c)], [*sorted(c), length])])


def nonfinite() -> st.SearchStrategy[float]:
    return st.sampled_from([math.nan, math.inf, -math.inf])


# ---- tolerances: what float rounding can honestly explain, and nothing more -----------------

def dot_tolerance(a: np.ndarray, b: np.ndarray) -> float:
    """Bound on |computed a·b − exact a·b| in a's dtype: n·eps·Σ|a_k b_k| (Higham, recursive sum)."""
    eps = float(np.finfo(a.dtype).eps)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return a.size * eps * float(np.abs(a64 * b64).sum())


def cosine_tolerance(case: GradCase) -> float:
    """Absolute error bound for each ``cos(g_i, ḡ)`` and the relative one for ``‖ḡ‖``.

    Two sources: each dot product (≤ D·eps relative to ‖g_i‖‖ḡ‖) and the mean itself, summed in
    the working dtype like an all-reduce (error ≤ eps·Σ‖g_i‖, which moves the cosine by up to
    about 2·eps·Σ‖g_i‖/‖ḡ‖). Cancelling ranks make the second term large, as they should.
    """
    eps = float(np.finfo(case.dtype).eps)
    g = case.grads.astype(np.float64)
    mean_norm = float(np.linalg.norm(g.mean(axis=0)))
    spread = float(np.linalg.norm(g, axis=1).sum()) / mean_norm if mean_norm > 0 else math.inf
    return 4.0 * eps * (case.dim + case.world_size + spread) + 1e-12
