"""The built-in combat simulator: SMAC-style scenarios stepped as batched tensors."""

from .engine import BattleSim, IllegalActionError, StepOutput
from .scenario import Scenario, ScenarioError, UnitType, load_catalogue, load_scenario

__all__ = ["BattleSim", "IllegalActionError", "StepOutput", "Scenario", "ScenarioError", "UnitType",
           "load_catalogue", "load_scenario"]
