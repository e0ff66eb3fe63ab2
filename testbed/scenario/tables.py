"""The four registries. Third-party packages add kinds through the entry-point groups named here."""
from __future__ import annotations

from testbed.scenario.registry import Registry

#: ``fn(dataset, **params) -> nn.Module`` whose ``forward(**batch)`` returns the mean loss.
MODELS = Registry("model", "testbed.models", skip_args=1)
#: ``fn(seed, **params) -> Dataset``; see ``testbed.data.Dataset``.
DATASETS = Registry("data", "testbed.datasets", skip_args=1)
#: ``fn(parameters, **params) -> torch.optim.Optimizer``.
OPTIMIZERS = Registry("optim", "testbed.optimizers", skip_args=1)
#: ``fn(plan, **params) -> None``: edits the rank's StepPlan while the perturbation is active.
PERTURBATIONS = Registry("perturbation", "testbed.perturbations", skip_args=1)
