"""Gradient accumulation: k micro-batches of b under DDP ``no_sync`` and one batch of k·b give the
same metrics. The hook fires once, on the synchronising backward, so the metrics describe the
accumulated local gradient (mean of the micro-batch gradients) and the loss is the mean of the
micro-batch losses - for equal-size micro-batches of a per-sample mean loss, exactly the big
batch's. (Had the hook also fired inside ``no_sync``, ‖g_i‖² would include a partial gradient.)"""
from __future__ import annotations

import pytest

from tests.helpers import run, tiny
from tests.scale_fixtures import assert_rows_close

METRICS = ("loss", "global_loss", "grad_norm", "mean_grad_norm", "cos_to_mean", "noise_scale")


@pytest.mark.timeout(300)
def test_accumulated_micro_batches_equal_the_big_batch(tmp_path):
    mlp = {"kind": "mlp", "hidden": 16, "depth": 1, "dropout": 0.0}
    big, big_rows, _ = run(tiny(steps=3, model=mlp, data={"batch_size": 8}), tmp_path / "big")
    acc, acc_rows, _ = run(tiny(steps=3, model=mlp, data={"batch_size": 4}, grad_accum=2), tmp_path / "acc")
    assert big.ok and acc.ok, (big.reason, acc.reason)
    assert_rows_close(acc_rows, big_rows, METRICS, rtol=1e-5, atol=1e-8)
    assert all(r["weights_in_sync"] for r in acc_rows)
