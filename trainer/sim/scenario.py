"""Unit types and scenarios as data: loading, validation, and the observation/action layout they imply.

A scenario file is TOML with `[units.NAME]` and `[scenarios.NAME]` tables (see `trainer/data/builtin.toml`,
which documents every field). Errors name the file, the field and the rule: `ScenarioError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

LOOPS_PER_SECOND = 22.4  # StarCraft II "faster" game speed: every time in the data is in these seconds
LOOPS_PER_STEP = 8  # one agent step, SMAC's step_mul
SECONDS_PER_STEP = LOOPS_PER_STEP / LOOPS_PER_SECOND
N_NON_ATTACK_ACTIONS = 6  # no-op, stop, move north / south / east / west
ACTION_NAMES = ("no-op", "stop", "north", "south", "east", "west")
SPEC_FORMAT_VERSION = 1


class ScenarioError(ValueError):
    """A unit or scenario definition broke a rule; the message names the field."""


@dataclass(frozen=True)
class UnitType:
    name: str
    race: str
    health: float
    shield: float
    armor: float
    damage: float
    attacks: int
    bonus_damage: float
    bonus_vs: str | None
    cooldown: float
    range: float
    speed: float
    radius: float
    attributes: tuple[str, ...]
    splash_radius: float
    splash_center: str
    suicide: bool
    regen: float
    shield_regen: float
    shield_regen_delay: float
    heal_rate: float
    heal_energy_cost: float
    energy_max: float
    energy_start: float
    energy_regen: float
    cooldown_norm: float
    flying: bool

    @property
    def is_healer(self) -> bool:
        return self.heal_rate > 0


@dataclass(frozen=True)
class Scenario:
    """A battle: who fights whom, where, for how long; and the per-unit observation layout that follows."""

    name: str
    map_size: tuple[float, float]
    episode_limit: int
    agents: tuple[UnitType, ...]
    enemies: tuple[UnitType, ...]
    agent_spawn: tuple[float, float]
    enemy_spawn: tuple[float, float]
    spacing: float = 1.0
    columns: int = 5
    jitter: float = 0.5
    sight_range: float = 9.0  # SMAC v1 uses these two for every unit when building observations and masks
    shoot_range: float = 6.0
    move_amount: float = 2.0
    attack_point: tuple[float, float] | None = None  # where the AI attack-moves to; default: the agents' start
    unit_types: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        order: list[str] = []
        for u in self.agents + self.enemies:
            if u.name not in order:
                order.append(u.name)
        object.__setattr__(self, "unit_types", tuple(order))
        if self.attack_point is None:
            object.__setattr__(self, "attack_point", self.agent_spawn)

    # --- sizes, laid out as SMAC lays them out -------------------------------------------------------
    @property
    def n_agents(self) -> int:
        return len(self.agents)

    @property
    def n_enemies(self) -> int:
        return len(self.enemies)

    @property
    def n_actions(self) -> int:
        return N_NON_ATTACK_ACTIONS + self.n_enemies

    @property
    def type_bits(self) -> int:
        """Width of the unit-type one-hot: 0 when only one unit type takes part."""
        return len(self.unit_types) if len(self.unit_types) > 1 else 0

    @property
    def agent_shields(self) -> bool:
        return any(u.shield > 0 for u in self.agents)

    @property
    def enemy_shields(self) -> bool:
        return any(u.shield > 0 for u in self.enemies)

    @property
    def enemy_feature_size(self) -> int:
        return 5 + int(self.enemy_shields) + self.type_bits

    @property
    def ally_feature_size(self) -> int:
        return 5 + int(self.agent_shields) + self.type_bits

    @property
    def own_feature_size(self) -> int:
        return 1 + int(self.agent_shields) + self.type_bits

    @property
    def obs_size(self) -> int:
        return (4 + self.n_enemies * self.enemy_feature_size + (self.n_agents - 1) * self.ally_feature_size
                + self.own_feature_size)

    @property
    def state_size(self) -> int:
        ally = 4 + int(self.agent_shields) + self.type_bits
        enemy = 3 + int(self.enemy_shields) + self.type_bits
        return self.n_agents * ally + self.n_enemies * enemy + self.n_agents * self.n_actions

    @property
    def agent_type_ids(self) -> list[int]:
        """Index into `unit_types` of each agent slot (what `per-type` sharing groups by)."""
        return [self.unit_types.index(u.name) for u in self.agents]

    @property
    def max_reward(self) -> float:
        """SMAC's normaliser: every enemy's health and shield, 10 per kill, 200 for the win."""
        return 10 * self.n_enemies + 200 + sum(u.health + u.shield for u in self.enemies)

    def layout(self) -> dict:
        """Everything that fixes what each observation float and each action index means."""
        types = self._types_by_name()
        healers = sorted(n for n, t in types.items() if t.is_healer)
        layout = {
            "format": SPEC_FORMAT_VERSION,
            "agents": [u.name for u in self.agents],
            "enemies": [u.name for u in self.enemies],
            "unit_types": list(self.unit_types),
            "normalisers": {n: [t.health, t.shield] for n, t in types.items()},
            "map": list(self.map_size),
            "sight_range": self.sight_range,
            "shoot_range": self.shoot_range,
            "move_amount": self.move_amount,
            "obs_size": self.obs_size,
            "state_size": self.state_size,
            "n_actions": self.n_actions,
        }
        if healers:  # a healer's target actions mean "heal ally k", not "attack enemy k". Only present when
            layout["healers"] = healers  # some unit heals, so healer-free layouts keep their hashes
        return layout

    @property
    def spec_hash(self) -> str:
        """Content hash of `layout()`: a model trained on one layout is never served another."""
        text = json.dumps(self.layout(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _types_by_name(self) -> dict[str, UnitType]:
        return {u.name: u for u in self.agents + self.enemies}

    def summary(self) -> dict:
        return {
            "name": self.name,
            "agents": _count_names(self.agents),
            "enemies": _count_names(self.enemies),
            "n_agents": self.n_agents,
            "n_enemies": self.n_enemies,
            "obs_size": self.obs_size,
            "state_size": self.state_size,
            "n_actions": self.n_actions,
            "episode_limit": self.episode_limit,
            "spec_hash": self.spec_hash,
        }


def _count_names(units: tuple[UnitType, ...]) -> str:
    counts: dict[str, int] = {}
    for u in units:
        counts[u.name] = counts.get(u.name, 0) + 1
    return ", ".join(f"{n} {name}" for name, n in counts.items())


# --- parsing and validation ---------------------------------------------------------------------------

_REQUIRED = object()

_UNIT_FIELDS = {
    # field: (kind, default)
    "race": (str, _REQUIRED),
    "health": (float, _REQUIRED),
    "shield": (float, 0.0),
    "armor": (float, 0.0),
    "damage": (float, _REQUIRED),
    "attacks": (int, 1),
    "bonus_damage": (float, 0.0),
    "bonus_vs": (str, None),
    "cooldown": (float, 1.0),
    "range": (float, _REQUIRED),
    "speed": (float, _REQUIRED),
    "radius": (float, 0.5),
    "attributes": (list, []),
    "splash_radius": (float, 0.0),
    "splash_center": (str, "target"),
    "suicide": (bool, False),
    "regen": (float, 0.0),
    "shield_regen": (float, 2.0),
    "shield_regen_delay": (float, 10.0),
    "heal_rate": (float, 0.0),
    "heal_energy_cost": (float, 0.0),
    "energy_max": (float, 0.0),
    "energy_start": (float, 0.0),
    "energy_regen": (float, 0.0),
    "cooldown_norm": (float, 1.0),
    "flying": (bool, False),
}

_SCENARIO_FIELDS = {
    "map": (list, _REQUIRED),
    "episode_limit": (int, _REQUIRED),
    "agents": (list, _REQUIRED),
    "enemies": (list, _REQUIRED),
    "agent_spawn": (list, _REQUIRED),
    "enemy_spawn": (list, _REQUIRED),
    "spacing": (float, 1.0),
    "columns": (int, 5),
    "jitter": (float, 0.5),
    "sight_range": (float, 9.0),
    "shoot_range": (float, 6.0),
    "move_amount": (float, 2.0),
    "attack_point": (list, None),
}

_RACES = ("terran", "protoss", "zerg", "other")


def _get(table: dict, key: str, kind, default, where: str):
    if key not in table:
        if default is _REQUIRED:
            raise ScenarioError(f"{where}.{key}: required field is missing")
        return default
    value = table[key]
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ScenarioError(f"{where}.{key}: must be a finite number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{where}.{key}: must be an integer, got {value!r}")
        return value
    if not isinstance(value, kind):
        raise ScenarioError(f"{where}.{key}: must be a {kind.__name__}, got {value!r}")
    return value


def _check_keys(table: dict, known: dict, where: str):
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(known)}")


def _parse_unit(name: str, table: dict, where: str) -> UnitType:
    if not isinstance(table, dict):
        raise ScenarioError(f"{where}: must be a table of unit fields, got {table!r}")
    _check_keys(table, _UNIT_FIELDS, where)
    v = {k: _get(table, k, kind, default, where) for k, (kind, default) in _UNIT_FIELDS.items()}
    if v["race"] not in _RACES:
        raise ScenarioError(f"{where}.race: must be one of {', '.join(_RACES)}, got {v['race']!r}")
    for key in ("health", "cooldown", "radius", "cooldown_norm"):
        if v[key] <= 0:
            raise ScenarioError(f"{where}.{key}: must be > 0, got {v[key]}")
    for key in ("shield", "armor", "damage", "bonus_damage", "range", "speed", "splash_radius", "regen",
                "shield_regen", "shield_regen_delay", "heal_rate", "heal_energy_cost", "energy_max",
                "energy_start", "energy_regen"):
        if v[key] < 0:
            raise ScenarioError(f"{where}.{key}: must be >= 0, got {v[key]}")
    if v["attacks"] < 1:
        raise ScenarioError(f"{where}.attacks: must be >= 1, got {v['attacks']}")
    if v["splash_center"] not in ("target", "self"):
        raise ScenarioError(f"{where}.splash_center: must be 'target' or 'self', got {v['splash_center']!r}")
    if not all(isinstance(a, str) for a in v["attributes"]):
        raise ScenarioError(f"{where}.attributes: must be a list of strings, got {v['attributes']!r}")
    if v["energy_start"] > v["energy_max"]:
        raise ScenarioError(f"{where}.energy_start: must be <= energy_max ({v['energy_max']}), got {v['energy_start']}")
    if v["heal_rate"] > 0 and v["damage"] > 0:
        raise ScenarioError(f"{where}: a unit either heals (heal_rate > 0) or attacks (damage > 0), not both")
    if v["heal_rate"] == 0 and v["damage"] == 0:
        raise ScenarioError(f"{where}: a unit needs damage > 0 or heal_rate > 0")
    v["attributes"] = tuple(v["attributes"])
    return UnitType(name=name, **v)


def _parse_pair(value, where: str, key: str) -> tuple[float, float]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        raise ScenarioError(f"{where}.{key}: must be a list of two numbers [x, y], got {value!r}")
    return float(value[0]), float(value[1])


def _parse_team(value: list, units: dict[str, UnitType], where: str) -> tuple[UnitType, ...]:
    team: list[UnitType] = []
    for i, group in enumerate(value):
        gwhere = f"{where}[{i}]"
        if not isinstance(group, dict):
            raise ScenarioError(f"{gwhere}: must be a table {{unit = NAME, count = N}}, got {group!r}")
        _check_keys(group, {"unit": None, "count": None}, gwhere)
        unit = _get(group, "unit", str, _REQUIRED, gwhere)
        count = _get(group, "count", int, _REQUIRED, gwhere)
        if unit not in units:
            raise ScenarioError(f"{gwhere}.unit: unknown unit type {unit!r}; known: {', '.join(sorted(units))}")
        if count < 1:
            raise ScenarioError(f"{gwhere}.count: must be >= 1, got {count}")
        team.extend([units[unit]] * count)
    if not team:
        raise ScenarioError(f"{where}: a team needs at least one unit")
    return tuple(team)


def _parse_scenario(name: str, table: dict, units: dict[str, UnitType], where: str) -> Scenario:
    if not isinstance(table, dict):
        raise ScenarioError(f"{where}: must be a table of scenario fields, got {table!r}")
    _check_keys(table, _SCENARIO_FIELDS, where)
    v = {k: _get(table, k, kind, default, where) for k, (kind, default) in _SCENARIO_FIELDS.items()}
    map_size = _parse_pair(v["map"], where, "map")
    if min(map_size) <= 0:
        raise ScenarioError(f"{where}.map: width and height must be > 0, got {v['map']!r}")
    if v["episode_limit"] < 1:
        raise ScenarioError(f"{where}.episode_limit: must be >= 1, got {v['episode_limit']}")
    if v["columns"] < 1:
        raise ScenarioError(f"{where}.columns: must be >= 1, got {v['columns']}")
    for key in ("spacing", "sight_range", "shoot_range", "move_amount"):
        if v[key] <= 0:
            raise ScenarioError(f"{where}.{key}: must be > 0, got {v[key]}")
    if v["jitter"] < 0:
        raise ScenarioError(f"{where}.jitter: must be >= 0, got {v['jitter']}")
    spawns = {}
    for key in ("agent_spawn", "enemy_spawn", "attack_point"):
        if v[key] is None:
            continue
        x, y = _parse_pair(v[key], where, key)
        if not (0 <= x <= map_size[0] and 0 <= y <= map_size[1]):
            raise ScenarioError(f"{where}.{key}: [{x}, {y}] lies outside the map {list(map_size)}")
        spawns[key] = (x, y)
    agents = _parse_team(v["agents"], units, f"{where}.agents")
    enemies = _parse_team(v["enemies"], units, f"{where}.enemies")
    if all(u.is_healer for u in agents) or all(u.is_healer for u in enemies):
        raise ScenarioError(f"{where}: each team needs at least one unit that attacks")
    return Scenario(
        name=name, map_size=map_size, episode_limit=v["episode_limit"], agents=agents, enemies=enemies,
        agent_spawn=spawns["agent_spawn"], enemy_spawn=spawns["enemy_spawn"],
        attack_point=spawns.get("attack_point"), spacing=v["spacing"],
        columns=v["columns"], jitter=v["jitter"], sight_range=v["sight_range"], shoot_range=v["shoot_range"],
        move_amount=v["move_amount"])


def _read_toml(source: str, text: str) -> dict:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{source}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"units", "scenarios"})
    if unknown:
        raise ScenarioError(f"{source}: unknown top-level table(s) {', '.join(unknown)}; expected [units.*] and [scenarios.*]")
    return data


def load_catalogue(files: tuple[str | Path, ...] | list = ()) -> dict[str, Scenario]:
    """Every scenario: the built-in ones, then each file's units and scenarios on top (same names replace)."""
    sources = [("trainer/data/builtin.toml",
                resources.files("trainer").joinpath("data/builtin.toml").read_text())]
    for f in files:
        path = Path(f)
        try:
            sources.append((str(path), path.read_text()))
        except OSError as e:
            raise ScenarioError(f"{path}: cannot read scenario file: {e.strerror}") from None
    raw_units: dict[str, tuple[str, dict]] = {}
    raw_scenarios: dict[str, tuple[str, dict]] = {}
    for source, text in sources:
        data = _read_toml(source, text)
        for key, target in (("units", raw_units), ("scenarios", raw_scenarios)):
            table = data.get(key, {})
            if not isinstance(table, dict):
                raise ScenarioError(f"{source}: {key} must be a table")
            for name, body in table.items():
                target[name] = (source, body)
    units = {name: _parse_unit(name, body, f"{src}: units.{name}") for name, (src, body) in raw_units.items()}
    return {name: _parse_scenario(name, body, units, f"{src}: scenarios.{name}")
            for name, (src, body) in raw_scenarios.items()}


def load_scenario(name: str, files: tuple[str | Path, ...] | list = ()) -> Scenario:
    """One scenario by name, e.g. `load_scenario("3m")`; `files` add user-written TOML scenario files."""
    catalogue = load_catalogue(files)
    if name not in catalogue:
        raise ScenarioError(f"unknown scenario {name!r}; known: {', '.join(catalogue)}")
    return catalogue[name]
