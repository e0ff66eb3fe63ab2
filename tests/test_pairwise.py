"""The exact N×N pairwise cosine matrix: equal to brute force, and bounded in memory.

Two levels. In process, the real hook runs over several fake DDP buckets with a fake N-rank
collective (so N > 1 without processes): its Gram matrix, norms and dots must match the direct
formulas, and the peak of what it allocates is measured. Then a real 3-rank gloo run with
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

from testbed.engine import hook
from testbed.metrics import step as metrics
from testbed.metrics.step import brute_force, pairwise_cosine

from tests.helpers import run, tiny

WORLD = 4
BUCKET_SIZES = (40_000, 100_000, 7)  # float32 elements; several buckets, the largest 400 kB
SLACK_BYTES = 16 * 1024  # scalars and N×N matrices: everything the hook may allocate besides the gather


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors that torch ops allocate while the mode is active.

    Every op output whose storage is new (not one of the op's inputs) is counted as allocated; it
    is counted as freed when the last tensor object on that storage (the output and any view of
    it made by a later op) is garbage. ``peak`` is thus the largest extra memory held at once by
    what the code under test allocated, ``live`` what is still held. What this does not see:
    memory a real collective backend (gloo / NCCL / HCCL) or a BLAS kernel allocates internally,
    references held only from C++ (none in the hook with the fakes below), and DDP's own buckets.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr → [bytes, live tensor objects]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        flat_args = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in flat_args if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            entry = self._storages.get(ptr)
            if entry is None:
                if ptr in inputs:
                    continue  # in place, or a view of memory allocated before the mode
                entry = self._storages[ptr] = [t.untyped_storage().nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out

    def _release(self, ptr: int) -> None:
        entry = self._storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[ptr]


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
    place (copy_, no allocation), all-reduce writes the SUM in place and returns a done future.
    ``offset``: where the current bucket starts in the flat gradient; ``bucket``: its buffer (the
    hook may gather a chunk of it: the chunk's place is found from its address)."""

    def __init__(self, grads: torch.Tensor):
        self.grads, self.offset, self.bucket = grads, 0, torch.empty(0)

    def all_gather_flat(self, out: torch.Tensor, inp: torch.Tensor, group: Any = None) -> None:
        n = inp.numel()
        start = self.offset + (inp.data_ptr() - self.bucket.data_ptr()) // inp.element_size()
        rows = out.view(self.grads.shape[0], n)
        for r in range(self.grads.shape[0]):
            rows[r].copy_(self.grads[r, start:start + n])

    def all_reduce(self, buf: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
        n = buf.numel()
        torch.sum(self.grads[:, self.offset:self.offset + n], dim=0, out=buf)
        done: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        done.set_result([buf])
        return type("Work", (), {"get_future": lambda self: done})()


def run_hook_step(monkeypatch: pytest.MonkeyPatch, grads: torch.Tensor, pairwise: bool) -> tuple[Any, list[dict]]:
    """One step of the real hook over BUCKET_SIZES buckets of rank 0; per bucket: peak and
    still-live bytes of what the hook allocated while handling it."""
    fake = FakeCollectives(grads)
    monkeypatch.setattr(hook, "_all_gather_flat", fake.all_gather_flat)
    monkeypatch.setattr(hook.dist, "all_reduce", fake.all_reduce)
    state = hook.ConsistencyState(process_group=None, world_size=grads.shape[0])
    state.begin_step(measure=True, pairwise=pairwise)
    per_bucket = []
    for size in BUCKET_SIZES:
        bucket = FakeBucket(grads[0, fake.offset:fake.offset + size])
        fake.bucket = bucket.buffer()
        with LiveBytes() as memory:
            hook.consistency_hook(state, bucket).wait()
        gc.collect()
        per_bucket.append({"peak": memory.peak, "live": memory.live, "elements": size})
        fake.offset += size
    return state.acc, per_bucket


def fake_grads(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(sum(BUCKET_SIZES), generator=g)
    # correlated ranks with different scales, as in training (cosines well away from 0 and 1)
    return torch.stack([(base + torch.randn(base.shape, generator=g)) * (r + 1) for r in range(WORLD)])


@pytest.mark.parametrize("chunk", [None, 30_000], ids=["whole-buckets", "chunked"])
def test_hook_gram_over_buckets_matches_brute_force(monkeypatch, chunk):
    if chunk:  # gather and multiply in several chunks per bucket
        monkeypatch.setattr(hook, "GATHER_CHUNK", chunk)
        monkeypatch.setattr(metrics, "GRAM_CHUNK", chunk // 3)
    grads = fake_grads()
    acc, _ = run_hook_step(monkeypatch, grads, pairwise=True)
    exact = brute_force(grads.double().numpy())
    assert np.allclose(pairwise_cosine(acc.gram.numpy()), exact["pairwise_cos"], atol=1e-5, rtol=0)
    g64 = grads.double()
    assert acc.gram.numpy() == pytest.approx((g64 @ g64.T).numpy(), rel=1e-5)
    assert float(acc.sq_norm) == pytest.approx(float(g64[0] @ g64[0]), rel=1e-5)
    assert float(acc.dot_with_mean) == pytest.approx(float(g64[0] @ g64.mean(0)), rel=1e-5)


@pytest.mark.parametrize("chunk", [None, 30_000], ids=["whole-buckets", "chunked"])
def test_pairwise_extra_memory_is_n_times_the_gathered_piece(monkeypatch, chunk):
    """The bound of ``hook.gather_bucket``: on a pairwise step the hook's extra peak memory is
    N × min(bucket, GATHER_CHUNK) elements plus small change (N×N matrices, scalars), all freed
    before the next bucket; on a plain measured step it allocates nothing bucket-sized."""
    if chunk:
        monkeypatch.setattr(hook, "GATHER_CHUNK", chunk)
    piece = hook.GATHER_CHUNK
    grads = fake_grads(1)
    _, plain = run_hook_step(monkeypatch, grads, pairwise=False)
    _, paired = run_hook_step(monkeypatch, grads, pairwise=True)
    for p, q in zip(plain, paired):
        gathered = WORLD * min(q["elements"], piece) * 4  # float32
        assert p["peak"] <= SLACK_BYTES
        assert gathered <= q["peak"] <= gathered + SLACK_BYTES, (q, gathered)
        assert p["live"] == q["live"] == 0  # nothing outlives its bucket: the peak cannot build up
    largest = WORLD * min(max(BUCKET_SIZES), piece) * 4
    assert max(q["peak"] for q in paired) <= largest + SLACK_BYTES


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
