"""Hypothesis profiles: ``ci`` (derandomized, bounded) when CI=true, else ``dev`` (more examples).
Select another with HYPOTHESIS_PROFILE=name. The ``one_rank`` fixture: a one-process gloo group for
tests that drive the monitor in this process."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=50, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev"))


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A world of one in this process (a HashStore, no port), torn down even when the test did."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
