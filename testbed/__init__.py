"""testbed: find silent inconsistency in data-parallel training."""
from testbed.scenario.spec import Scenario, ScenarioError, load_scenario

__version__ = "0.1.0"
__all__ = ["Scenario", "ScenarioError", "load_scenario", "__version__", "attach", "Monitor"]  # + TestbedCallback (needs transformers), TestbedLightningCallback (lightning)

# The drop-in monitor, imported on first use: ``import testbed`` stays light (no torch.distributed,
# no transformers - TestbedCallback needs transformers, the rest does not).
_LAZY = {"attach": "testbed.integrations.monitor", "Monitor": "testbed.integrations.monitor", "TestbedCallback": "testbed.integrations.trainer_callback",
         "TestbedLightningCallback": "testbed.integrations.lightning_callback"}  # needs the lightning extra


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'testbed' has no attribute {name!r}")
