"""The built-in combat simulator: SMAC-style scenarios stepped as batched tensors."""

from .scenario import Scenario, ScenarioError, UnitType, load_catalogue, load_scenario

__all__ = ["BattleSim", "IllegalActionError", "StepOutput", "Scenario", "ScenarioError", "UnitType",
           "load_catalogue", "load_scenario"]

_ENGINE = ("BattleSim", "IllegalActionError", "StepOutput")


def __getattr__(name: str):
    # The engine needs torch (over a second to import). Scenarios do not, and neither does every command that
    # reads them: `phalanx health`, a container's probe every few seconds, should not pay for torch each time.
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
