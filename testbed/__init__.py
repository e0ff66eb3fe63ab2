"""testbed: find silent inconsistency in data-parallel training."""
from testbed.spec import Scenario, ScenarioError, load_scenario

__version__ = "0.1.0"
__all__ = ["Scenario", "ScenarioError", "load_scenario", "__version__"]
