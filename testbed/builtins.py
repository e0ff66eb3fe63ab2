"""Importing this module registers every built-in kind (models, data, optimizers, perturbations)."""
from testbed import data, models, optim, perturbations  # noqa: F401
from testbed import faults  # noqa: F401
from testbed import lm, textdata  # noqa: F401
from testbed import alpaca, hf  # noqa: F401  (transformers is imported only when these kinds are built)
