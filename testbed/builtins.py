"""Importing this module registers every built-in kind (models, data, optimizers, perturbations)."""
from testbed import data, models, optim, perturbations  # noqa: F401
