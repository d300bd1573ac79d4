"""pysc2 raw units -> the simulator's per-unit features, and policy actions -> pysc2 raw unit commands.

The feature layout is not re-implemented here: `RawConverter` writes the game's units into the state
tensors of a one-game `BattleSim` (pos, hp, sh, energy, cooldown, alive, last_actions) and calls its
`refresh()`, so real games and simulated games share one observation code path and cannot drift.

Coordinates. pysc2 reports `raw_units` x/y on an integer grid of `raw_resolution` cells over the map
(`AgentInterfaceFormat.raw_resolution`, default: the map size, i.e. one cell per map unit), with y
flipped (row 0 is the map's top):  x_raw = floor(x_world * s_x),  y_raw = floor((H - y_world) * s_y),
s = raw_resolution / max(W, H), (W, H) = `game_info.start_raw.map_size`. `RawGeometry` inverts that
(taking the cell centre, as pysc2 itself does for actions) and then subtracts `origin`, the world point
that is the scenario's (0, 0); the scenario's north (+y) is the game's north. Positions are therefore
only as fine as one raw cell: use a `raw_resolution` several times the map size (SC2Battle uses 8x).
pysc2 also truncates health, shield, energy and weapon cooldown to integers in `raw_units` (int64).

Slots. On the first frame of an episode (`assign`) every own/enemy unit gets the slot of the scenario's
agent/enemy list: the units of each type, sorted by tag, fill that type's slots in scenario order. A slot
keeps its unit's tag for the whole episode (as SMAC keeps a unit's id).

Life and death follow SMAC: a unit in `raw_units` is alive, whatever its truncated health reads; a unit whose
tag is missing is dead in that frame (its slot zeroed, like the simulator's dead units), and should the tag come
back (under fog of war, an enemy out of every unit's sight is missing too) it is alive again. `dead` records
every unit that has been missing this episode: SMAC's death tracker, which counts a unit's kill, and its
damage, once (SC2Battle's reward). Tags that hold no slot are ignored, as SMAC ignores them: SMAC's maps
respawn both armies once every unit is dead, so after a mutual wipe new tags arrive in the same frame in which
the old ones vanish.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from pysc2_evolved.lib import actions as sc2_actions
from pysc2_evolved.lib import units as sc2_units
from pysc2_evolved.lib.features import FeatureUnit

from trainer.sim.engine import BattleSim, IllegalActionError, StepOutput
from trainer.sim.scenario import N_NON_ATTACK_ACTIONS, Scenario

RAW = sc2_actions.RAW_FUNCTIONS
SELF, ENEMY = 1, 4  # FeatureUnit.alliance values (2 ally and 3 neutral are ignored)
# Health for a unit in raw_units whose health reads 0: pysc2 truncates health to an integer, so its true
# health lies in (0, 1); the middle keeps it alive in the features and puts the reward off by under half an HP.
TRUNCATED_HEALTH = 0.5

# pysc2 (standard StarCraft II) unit type ids -> the built-in scenarios' unit names
DEFAULT_UNIT_TYPES: dict[int, str] = {
    int(sc2_units.Terran.Marine): "marine",
    int(sc2_units.Terran.Marauder): "marauder",
    int(sc2_units.Terran.Medivac): "medivac",
    int(sc2_units.Protoss.Zealot): "zealot",
    int(sc2_units.Protoss.Stalker): "stalker",
    int(sc2_units.Protoss.Colossus): "colossus",
    int(sc2_units.Zerg.Zergling): "zergling",
    int(sc2_units.Zerg.Hydralisk): "hydralisk",
    int(sc2_units.Zerg.Baneling): "baneling",
}


class SlotError(ValueError):
    """The game's units do not fit the scenario's slots (an unknown unit type, the wrong count), or there
    are no slots yet (observe() before assign())."""


def smac_ally_unit_types(scenario: Scenario, min_type_id: int) -> dict[int, str]:
    """SMAC's maps give the agents' units custom type ids: consecutive from the smallest, in the
    alphabetical order of the unit names (MMM: marauder, marine, medivac). -> {type id: unit name}."""
    names = sorted({u.name for u in scenario.agents})
    return {min_type_id + i: name for i, name in enumerate(names)}


def _describe_type(type_id: int) -> str:
    known = sc2_units.get_unit_type(type_id)
    return f"{type(known).__name__}.{known.name}" if known is not None else "not a standard pysc2 type"


@dataclass(frozen=True)
class RawGeometry:
    """How raw-unit grid coordinates map to scenario map units (see the module docstring).

    map_size: (W, H) world size of the frame raw units are reported in (`game_info.start_raw.map_size`).
    raw_resolution: (rx, ry) the raw grid (`AgentInterfaceFormat.raw_resolution`); None: the map size.
    origin: world coordinates of the scenario's (0, 0).
    """

    map_size: tuple[float, float]
    raw_resolution: tuple[int, int] | None = None
    origin: tuple[float, float] = (0.0, 0.0)

    @property
    def scale(self) -> np.ndarray:
        """Raw cells per map unit along x and y, (2,)."""
        res = np.asarray(self.raw_resolution if self.raw_resolution is not None else self.map_size, float)
        return res / max(self.map_size)

    @property
    def resolution(self) -> np.ndarray:
        return np.asarray(self.raw_resolution if self.raw_resolution is not None else self.map_size, int)

    def to_map(self, raw_xy: np.ndarray) -> np.ndarray:
        """(..., 2) raw grid x, y -> (..., 2) scenario map coordinates (the raw cell's centre)."""
        world = (np.floor(np.asarray(raw_xy, float)) + 0.5) / self.scale
        world[..., 1] = self.map_size[1] - world[..., 1]
        return world - np.asarray(self.origin, float)

    def to_raw(self, map_xy: np.ndarray) -> np.ndarray:
        """(..., 2) scenario map coordinates -> (..., 2) int64 raw grid cells, clipped to the grid."""
        world = np.asarray(map_xy, float) + np.asarray(self.origin, float)
        world[..., 1] = self.map_size[1] - world[..., 1]
        cells = np.floor(world * self.scale).astype(np.int64)
        return np.clip(cells, 0, self.resolution - 1)


def raw_units_of(observation) -> np.ndarray:
    """The (K, len(FeatureUnit)) raw_units array from a pysc2 TimeStep, its observation, or the array."""
    if hasattr(observation, "observation"):
        observation = observation.observation
    if isinstance(observation, Mapping):
        if "raw_units" not in observation:
            raise ValueError("the observation has no raw_units: create the env with use_raw_units=True")
        observation = observation["raw_units"]
    arr = np.asarray(observation)
    if arr.ndim != 2 or arr.shape[1] < len(FeatureUnit):
        if arr.size == 0:
            return np.zeros((0, len(FeatureUnit)), np.int64)
        raise ValueError(f"raw_units must have shape (K, {len(FeatureUnit)}), got {arr.shape}")
    return arr


class RawConverter:
    """One scenario's view of a real game: raw units in, BattleSim-layout obs/state/avail out, and
    policy actions out as pysc2 raw function calls.

    `conv.assign(raw_units)` at the start of each episode, then `conv.observe(raw_units)` every step ->
    StepOutput with obs (1, A, O), state (1, S), avail (1, A, N), alive (1, A) (reward and episode fields
    zero; SC2Battle fills them). `conv.to_raw_actions(actions (A,))` -> list of pysc2 FunctionCalls.
    `unit_types` adds or overrides {pysc2 unit type id: scenario unit name}; with `smac_ally_types`, own
    units whose type ids are all unknown are read as SMAC's custom ally ids (`smac_ally_unit_types`).
    """

    def __init__(self, scenario: Scenario, geometry: RawGeometry, unit_types: Mapping[int, str] | None = None,
                 smac_ally_types: bool = True):
        self.scenario = sc = scenario
        self.geometry = geometry
        self.unit_types = {**DEFAULT_UNIT_TYPES, **{int(k): v for k, v in (unit_types or {}).items()}}
        self.smac_ally_types = smac_ally_types
        self.sim = BattleSim(scenario, 1, check_actions=False, auto_reset=False)
        self.A, self.M = sc.n_agents, sc.n_enemies
        self.tags = np.zeros(self.A + self.M, np.int64)  # (U,) the unit tag in each slot; 0 before `assign`
        self.dead = np.zeros(self.A + self.M, bool)  # (U,) SMAC's death tracker: missing at least once
        self._own_types: dict[int, str] = self.unit_types

    # --- raw units -> slots ---------------------------------------------------------------------------
    def _type_name(self, row: np.ndarray, own: bool) -> str:
        table = self._own_types if own else self.unit_types
        tid, tag = int(row[FeatureUnit.unit_type]), int(row[FeatureUnit.tag])
        side = "own" if own else "enemy"
        if tid not in table:
            raise SlotError(f"{side} unit (tag {tag}) has unit type id {tid} ({_describe_type(tid)}), which is not "
                            f"in the unit-type table; scenario {self.scenario.name} uses "
                            f"{', '.join(self.scenario.unit_types)}: pass unit_types={{{tid}: '<unit name>'}}")
        name = table[tid]
        team = self.scenario.agents if own else self.scenario.enemies
        if name not in {u.name for u in team}:
            raise SlotError(f"{side} unit (tag {tag}) is a {name} (type id {tid}), but scenario "
                            f"{self.scenario.name}'s {'agents' if own else 'enemies'} are "
                            f"{', '.join(sorted({u.name for u in team}))}")
        return name

    def assign(self, observation) -> None:
        """Fix the slots for a new episode from its first frame (raw units: see `raw_units_of`).
        Raises SlotError when the units do not match the scenario's agents and enemies one to one."""
        raw = raw_units_of(observation)
        own = raw[raw[:, FeatureUnit.alliance] == SELF]
        self._own_types = self.unit_types
        if self.smac_ally_types and len(own):
            own_ids = own[:, FeatureUnit.unit_type].astype(int)
            if not any(int(t) in self.unit_types for t in own_ids):  # all custom: a SMAC map
                self._own_types = smac_ally_unit_types(self.scenario, int(own_ids.min()))
        tags = np.zeros(self.A + self.M, np.int64)
        for is_own, first, team in ((True, 0, self.scenario.agents), (False, self.A, self.scenario.enemies)):
            rows = raw[raw[:, FeatureUnit.alliance] == (SELF if is_own else ENEMY)]
            by_type: dict[str, list[int]] = {}
            for row in rows:
                by_type.setdefault(self._type_name(row, is_own), []).append(int(row[FeatureUnit.tag]))
            want: dict[str, int] = {}
            for u in team:
                want[u.name] = want.get(u.name, 0) + 1
            got = {n: len(t) for n, t in by_type.items()}
            if got != want:
                side = "own units" if is_own else "enemy units"
                fmt = lambda d: ", ".join(f"{v} {k}" for k, v in sorted(d.items())) or "none"  # noqa: E731
                raise SlotError(f"{side}: scenario {self.scenario.name} expects {fmt(want)}, the game has {fmt(got)}")
            queues = {n: sorted(t) for n, t in by_type.items()}
            for i, u in enumerate(team):
                tags[first + i] = queues[u.name].pop(0)
        self.tags = tags
        self.dead = np.zeros(self.A + self.M, bool)
        self.sim.last_actions = torch.zeros_like(self.sim.last_actions)

    def observe(self, observation, last_actions=None) -> StepOutput:
        """Write the frame's units into the simulator's state and recompute its features. A slot whose
        tag is missing from the frame is dead in it (and tracked in `dead`); tags without a slot are ignored
        (see the module docstring).

        observation: a TimeStep / observation / raw_units array of the current frame.
        last_actions: (A,) the actions just taken (SMAC's last-action one-hots in the state); None keeps them.
        Returns StepOutput: obs (1, A, O), state (1, S), avail (1, A, N) bool, alive (1, A) bool.
        """
        if not self.tags.any():
            raise SlotError("observe() before assign(): call assign() on the episode's first frame")
        raw = raw_units_of(observation)
        row_of = {int(t): i for i, t in enumerate(raw[:, FeatureUnit.tag])}
        sim, U = self.sim, self.A + self.M
        pos = sim.pos[0].numpy().astype(float)  # a dead unit keeps its last position
        hp, sh, energy, cooldown = (np.zeros(U) for _ in range(4))
        alive = np.zeros(U, bool)
        for slot, tag in enumerate(self.tags):
            i = row_of.get(int(tag))
            if i is None:  # gone: dead in this frame, and its death tracked (it may show up again: see above)
                self.dead[slot] = True
                continue
            row = raw[i]
            alive[slot] = True
            pos[slot] = self.geometry.to_map(row[[FeatureUnit.x, FeatureUnit.y]])
            hp[slot] = max(float(row[FeatureUnit.health]), TRUNCATED_HEALTH)
            sh[slot] = row[FeatureUnit.shield]
            energy[slot], cooldown[slot] = row[FeatureUnit.energy], row[FeatureUnit.weapon_cooldown]
        f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)[None]  # noqa: E731
        sim.pos, sim.hp, sim.sh = f32(pos), f32(hp), f32(sh)
        sim.energy, sim.cooldown = f32(energy), f32(cooldown)
        sim.alive = torch.as_tensor(alive)[None]
        if last_actions is not None:
            sim.last_actions = torch.as_tensor(np.asarray(last_actions), dtype=torch.int64).reshape(1, self.A)
        return sim.refresh()

    # --- policy actions -> raw commands ---------------------------------------------------------------
    def to_raw_actions(self, actions, check: bool = True) -> list:
        """(A,) policy actions on the last observed frame -> pysc2 raw FunctionCalls (one per acting unit).

        0 no-op: nothing · 1 Stop_quick · 2-5 Move_pt by `move_amount` north/south/east/west ·
        6+k Attack_unit on enemy slot k's tag (healers: Effect_Heal_unit on ally slot k's tag).
        Dead agents send nothing. `check` refuses actions the last `avail` mask forbids (IllegalActionError).
        Unit arguments are real unit tags: pysc2 passes numbers >= len(raw_units) through as tags (real
        tags are >= 2**18), smaller ones it would read as raw_units row indices.
        """
        acts = np.asarray(actions, dtype=np.int64).reshape(-1)
        if acts.shape != (self.A,):
            raise ValueError(f"actions must have shape ({self.A},), got {np.asarray(actions).shape}")
        if check:
            avail = self.sim.avail[0].numpy()
            for a, act in enumerate(acts):
                if not 0 <= act < self.scenario.n_actions:
                    raise IllegalActionError(f"action {act} for agent {a} is outside 0..{self.scenario.n_actions - 1}")
                if not avail[a, act]:
                    raise IllegalActionError(f"action {act} for agent {a} is masked out "
                                             f"(legal: {np.flatnonzero(avail[a]).tolist()})")
        alive = self.sim.alive[0].numpy()
        pos = self.sim.pos[0].numpy()
        moves = self.sim.moves.numpy() * self.scenario.move_amount
        calls = []
        for a, act in enumerate(acts):
            if not alive[a] or act == 0:
                continue
            me = [int(self.tags[a])]
            if act == 1:
                calls.append(RAW.Stop_quick("now", me))
            elif act < N_NON_ATTACK_ACTIONS:
                target = self.geometry.to_raw(pos[a] + moves[act - 2])
                calls.append(RAW.Move_pt("now", me, [int(target[0]), int(target[1])]))
            else:
                k = int(act) - N_NON_ATTACK_ACTIONS
                if self.sim.healer[a]:
                    calls.append(RAW.Effect_Heal_unit("now", me, [int(self.tags[k])]))
                else:
                    calls.append(RAW.Attack_unit("now", me, [int(self.tags[self.A + k])]))
        return calls
