"""The built-in combat simulator: SMAC-style scenarios stepped as batched tensors."""

from typing import TYPE_CHECKING

from .scenario import Scenario, ScenarioError, UnitType, load_catalogue, load_scenario

if TYPE_CHECKING:
    from .engine import BattleSim, IllegalActionError, StepOutput

__all__ = ["BattleSim", "IllegalActionError", "StepOutput", "Scenario", "ScenarioError", "UnitType",
           "load_catalogue", "load_scenario"]

_ENGINE = ("BattleSim", "IllegalActionError", "StepOutput")


def __getattr__(name: str):
    # The engine needs torch (over a second to import). Scenarios do not, and neither does every command that
    # reads them: `phalanx health`, a container's probe every few seconds, should not pay for torch each time.
    if name in _ENGINE:
        from . import engine

        value = globals()[name] = getattr(engine, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
