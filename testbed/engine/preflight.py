"""Checks a scenario's kinds can make on the launching machine before any rank starts.

A registered model / data / optimizer function may carry a ``preflight(source, params)``
attribute that raises :class:`~testbed.scenario.errors.ScenarioError` for a setting that is valid
in the file but bound to fail on every rank with these files (e.g. a tokenizer that needs
``trust_remote_code``). Refusing it here gives one line naming the field instead of N tracebacks.
Files that are not on this machine are not checked (a plan may be made on a laptop). Also here:
an lr schedule needs transformers (``testbed.workloads.optim.build_scheduler``).
"""
from __future__ import annotations

import importlib.util

from testbed.scenario.errors import ScenarioError
from testbed.scenario.spec import Scenario
from testbed.scenario.tables import DATASETS, MODELS, OPTIMIZERS


def preflight(scenario: Scenario) -> None:
    """Run every component's ``preflight``; raises ScenarioError naming the file and field."""
    if not scenario.schedule.is_constant and importlib.util.find_spec("transformers") is None:
        raise ScenarioError(scenario.source, "optim.schedule", "'constant' without warmup, or transformers installed "
                            "(pip install -e '.[hf]'): warmup and decay use transformers' schedulers",
                            scenario.schedule.name)
    for component, registry in ((scenario.model, MODELS), (scenario.data, DATASETS), (scenario.optim, OPTIMIZERS)):
        check = getattr(registry.get(component.kind), "preflight", None)
        if check is not None:
            check(scenario.source, component.params)
