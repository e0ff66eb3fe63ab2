"""The exact N×N pairwise cosine matrix: equal to brute force, and bounded in memory.

Two levels. In process, the real hook runs over several fake DDP buckets with a fake N-rank
collective (so N > 1 without processes): its Gram matrix, norms and dots must match the direct
formulas, and every byte it allocates is counted. Then a real 3-rank gloo run with
``metrics.self_check`` (full all-gather of the local gradients) must agree within 1e-5.
"""
from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from testbed import hook, metrics
from testbed.metrics import brute_force, pairwise_cosine

from tests.helpers import run, tiny

WORLD = 4
BUCKET_SIZES = (40_000, 100_000, 7)  # float32 elements; several buckets, the largest 400 kB
SLACK_BYTES = 16 * 1024  # scalars and N×N matrices: everything the hook may allocate besides the gather


class AllocationCounter(TorchDispatchMode):
    """Counts the bytes of every tensor that a torch op creates with fresh storage while active.

    The sum of fresh allocations inside one hook call is an upper bound on the peak extra memory
    of that call; ``alive()`` tells whether any of them outlived it (they must not, or the peak
    would grow from bucket to bucket). What this does not see: memory a real collective backend
    (gloo / NCCL / HCCL) or a BLAS kernel allocates internally, and DDP's own buckets.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fresh_bytes = 0
        self._fresh_ptrs: set[int] = set()
        self._refs: list[weakref.ref[torch.Tensor]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr not in inputs and ptr not in self._fresh_ptrs:
                self._fresh_ptrs.add(ptr)
                self.fresh_bytes += t.untyped_storage().nbytes()
            if ptr in self._fresh_ptrs:
                self._refs.append(weakref.ref(t))
        return out

    def alive(self) -> int:
        gc.collect()
        return sum(1 for r in self._refs if r() is not None)


class FakeBucket:
    """The parts of ``dist.GradBucket`` the hook uses, for one slice of the flat gradient."""

    def __init__(self, local: torch.Tensor):
        self._buffer = local.clone()
        self._param = torch.nn.Parameter(torch.zeros_like(local))
        self._param.grad = local.clone()  # DDP's default mode: .grad keeps the local gradient

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return [self._param]

    def gradients(self) -> list[torch.Tensor]:
        return [self._buffer]


class FakeCollectives:
    """Rank 0 of a fake N-rank group whose peers hold ``grads[r]``: all-gather fills each row in
    place (copy_, no allocation), all-reduce writes the SUM in place and returns a done future."""

    def __init__(self, grads: torch.Tensor):
        self.grads, self.offset = grads, 0

    def all_gather_flat(self, out: torch.Tensor, inp: torch.Tensor, group: Any = None) -> None:
        n = inp.numel()
        rows = out.view(self.grads.shape[0], n)
        for r in range(self.grads.shape[0]):
            rows[r].copy_(self.grads[r, self.offset:self.offset + n])

    def all_reduce(self, buf: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
        n = buf.numel()
        torch.sum(self.grads[:, self.offset:self.offset + n], dim=0, out=buf)
        done: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        done.set_result([buf])
        return type("Work", (), {"get_future": lambda self: done})()


def run_hook_step(monkeypatch: pytest.MonkeyPatch, grads: torch.Tensor, pairwise: bool) -> tuple[Any, list[dict]]:
    """One step of the real hook over BUCKET_SIZES buckets of rank 0; per bucket: bytes, alive."""
    fake = FakeCollectives(grads)
    monkeypatch.setattr(hook, "_all_gather_flat", fake.all_gather_flat)
    monkeypatch.setattr(hook.dist, "all_reduce", fake.all_reduce)
    state = hook.ConsistencyState(process_group=None, world_size=grads.shape[0])
    state.begin_step(measure=True, pairwise=pairwise)
    per_bucket = []
    for size in BUCKET_SIZES:
        bucket = FakeBucket(grads[0, fake.offset:fake.offset + size])
        with AllocationCounter() as counter:
            hook.consistency_hook(state, bucket).wait()
        per_bucket.append({"bytes": counter.fresh_bytes, "alive": counter.alive(), "bucket_bytes": size * 4})
        fake.offset += size
    return state.acc, per_bucket


def fake_grads(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(sum(BUCKET_SIZES), generator=g)
    # correlated ranks with different scales, as in training (cosines well away from 0 and 1)
    return torch.stack([(base + torch.randn(base.shape, generator=g)) * (r + 1) for r in range(WORLD)])


def test_hook_gram_over_buckets_matches_brute_force(monkeypatch):
    monkeypatch.setattr(metrics, "GRAM_CHUNK", 30_000)  # several chunks per bucket, too
    grads = fake_grads()
    acc, _ = run_hook_step(monkeypatch, grads, pairwise=True)
    exact = brute_force(grads.double().numpy())
    assert np.allclose(pairwise_cosine(acc.gram.numpy()), exact["pairwise_cos"], atol=1e-5, rtol=0)
    g64 = grads.double()
    assert acc.gram.numpy() == pytest.approx((g64 @ g64.T).numpy(), rel=1e-5)
    assert float(acc.sq_norm) == pytest.approx(float(g64[0] @ g64[0]), rel=1e-5)
    assert float(acc.dot_with_mean) == pytest.approx(float(g64[0] @ g64.mean(0)), rel=1e-5)


def test_pairwise_extra_memory_is_n_times_the_bucket(monkeypatch):
    """The bound of ``hook.gather_bucket``: on a pairwise step the hook allocates N × (bucket
    bytes) per bucket plus small change, and frees it before the next bucket, so the extra peak
    is N × the largest bucket; on a plain measured step it allocates no bucket-sized tensor."""
    grads = fake_grads(1)
    _, plain = run_hook_step(monkeypatch, grads, pairwise=False)
    _, paired = run_hook_step(monkeypatch, grads, pairwise=True)
    for p, q in zip(plain, paired):
        assert p["bytes"] <= SLACK_BYTES
        assert WORLD * q["bucket_bytes"] <= q["bytes"] <= WORLD * q["bucket_bytes"] + SLACK_BYTES
        assert p["alive"] == q["alive"] == 0  # nothing outlives its bucket
    largest = max(BUCKET_SIZES) * 4
    assert max(q["bytes"] for q in paired) - max(p["bytes"] for p in plain) <= WORLD * largest + SLACK_BYTES


@pytest.mark.timeout(120)
def test_real_gloo_pairwise_matrix_equals_brute_force(tmp_path):
    raw = tiny(world_size=3, steps=3, metrics={"pairwise_every": 1, "self_check": True, "weight_check_every": 0})
    result, rows, _ = run(raw, tmp_path)
    assert result.ok and len(rows) == 3
    for row in rows:
        got = np.asarray(row["pairwise_cos"], dtype=float)
        want = np.asarray(row["self_check"]["pairwise_cos"], dtype=float)
        assert got.shape == (3, 3)
        assert np.max(np.abs(got - want)) < 1e-5
        off = want[~np.eye(3, dtype=bool)]
        assert abs(row["pairwise_cos_mean"] - off.mean()) < 1e-5
        assert off.min() < 0.999  # ranks read different shards: a non-trivial matrix
