"""workloads — what is trained: models, datasets, optimizers, the HF / openPangu / alpaca path and the
tiny checkpoints the tests build. Built-in kinds register themselves on import (entry points in
pyproject.toml point the registries here).

Imports: scenario, perturb (a dataset applies a rank's StepPlan), torch, transformers (lazily).
"""
