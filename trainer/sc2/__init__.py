"""Real StarCraft II through pysc2's raw interface: the same per-unit features, masks and actions as the
built-in simulator. Needs `pysc2-evolved` (the `sc2` extra); playing needs the game (see `battle`)."""

from .adapter import (DEFAULT_UNIT_TYPES, RawConverter, RawGeometry, SlotError, raw_units_of,
                      smac_ally_unit_types)
from .battle import SC2Battle, geometry_from_env, make_sc2_env, smac_map

__all__ = ["DEFAULT_UNIT_TYPES", "RawConverter", "RawGeometry", "SlotError", "SC2Battle", "geometry_from_env",
           "make_sc2_env", "raw_units_of", "smac_ally_unit_types", "smac_map"]
