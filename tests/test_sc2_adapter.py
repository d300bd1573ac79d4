"""The pysc2 adapter without the game: hand-built raw units and pysc2's mock env.

The reference for every feature is the built-in simulator itself: a BattleSim in some state is written
out as pysc2 raw units, read back through the adapter, and must give the same obs/state/avail exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
pytest.importorskip("pysc2_evolved")

from pysc2_evolved.env import mock_sc2_env, sc2_env  # noqa: E402
from pysc2_evolved.lib import actions, features, named_array, point  # noqa: E402
from pysc2_evolved.lib.features import FeatureUnit  # noqa: E402
from pysc2_evolved.lib.units import Protoss, Terran  # noqa: E402
from pysc2_evolved.tests import dummy_observation  # noqa: E402
from s2clientprotocol import common_pb2  # noqa: E402

from trainer.sc2 import RawConverter, RawGeometry, SC2Battle, SlotError, smac_ally_unit_types  # noqa: E402
from trainer.sim import BattleSim, IllegalActionError, load_scenario  # noqa: E402

RAW = actions.RAW_FUNCTIONS
GEO = RawGeometry(map_size=(32.0, 32.0), raw_resolution=(256, 256))  # 8 raw cells per map unit
TYPE_ID = {"marine": Terran.Marine, "marauder": Terran.Marauder, "medivac": Terran.Medivac}
TAG0 = 0x1_0000_0000  # real SC2 tags are large (pysc2 reads small numbers as raw_units row indices)


def unit_row(type_id, alliance, tag, raw_xy, health, shield=0, energy=0, cooldown=0):
    row = np.zeros(len(FeatureUnit), np.int64)
    row[FeatureUnit.unit_type], row[FeatureUnit.alliance], row[FeatureUnit.tag] = type_id, alliance, tag
    row[FeatureUnit.x], row[FeatureUnit.y] = raw_xy
    row[FeatureUnit.health], row[FeatureUnit.shield] = health, shield
    row[FeatureUnit.energy], row[FeatureUnit.weapon_cooldown] = energy, cooldown
    row[FeatureUnit.owner] = 1 if alliance == 1 else 2
    return row


def neutral_row():
    return unit_row(int(Protoss.Zealot) + 10_000, 3, 7, (3, 3), 10)  # neutral units are ignored, any type


def random_battle(name: str, seed: int, dead: tuple[int, ...]) -> BattleSim:
    """A BattleSim mid-fight, with values the raw interface can carry exactly: positions on raw cell
    centres, integer health/shield/energy/cooldown, the units in `dead` killed."""
    sc = load_scenario(name)
    sim = BattleSim(sc, 1, check_actions=False, auto_reset=False)
    g = np.random.default_rng(seed)
    U, A = sim.n_units, sim.n_agents
    pos = np.concatenate([g.uniform([9, 13], [13, 19], (A, 2)), g.uniform([13, 13], [17, 19], (U - A, 2))])
    sim.pos = torch.tensor(GEO.to_map(GEO.to_raw(pos)), dtype=torch.float32)[None]
    sim.hp = torch.floor(sim.max_hp * torch.tensor(g.uniform(0.2, 1.0, U), dtype=torch.float32))[None]
    sim.sh = torch.floor(sim.max_sh * torch.tensor(g.uniform(0.0, 1.0, U), dtype=torch.float32))[None]
    sim.energy = torch.floor(sim.energy_max * 0.4)[None].expand(1, U).clone()
    sim.cooldown = torch.tensor(g.integers(0, 15, U), dtype=torch.float32)[None]
    alive = torch.ones(1, U, dtype=torch.bool)
    alive[0, list(dead)] = False
    sim.alive = alive
    for t in (sim.hp, sim.sh, sim.energy, sim.cooldown):
        t[~alive] = 0.0
    sim.last_actions = torch.tensor(g.integers(0, 6, (1, A)))
    sim.refresh()
    return sim


def raw_from_sim(sim: BattleSim, type_ids=None, shuffle_seed: int = 0) -> np.ndarray:
    """The sim's living units as pysc2 raw_units rows, slot i tagged TAG0 + 3 i, rows shuffled."""
    sc, A = sim.scenario, sim.n_agents
    type_ids = type_ids or {}
    names = [u.name for u in sc.agents + sc.enemies]
    raw_xy = GEO.to_raw(sim.pos[0].numpy())
    rows = [neutral_row()]
    for i, name in enumerate(names):
        if not sim.alive[0, i]:
            continue
        tid = type_ids.get(name, TYPE_ID.get(name)) if i < A else TYPE_ID[name]
        rows.append(unit_row(tid, 1 if i < A else 4, TAG0 + 3 * i, raw_xy[i], int(sim.hp[0, i]), int(sim.sh[0, i]),
                             int(sim.energy[0, i]), int(sim.cooldown[0, i])))
    rows = np.stack(rows)
    return rows[np.random.default_rng(shuffle_seed).permutation(len(rows))]


def full_raw(name: str) -> np.ndarray:
    """Every unit of the scenario alive at full health and shield (the episode's first frame)."""
    sim = random_battle(name, seed=0, dead=())
    sim.hp, sim.sh = sim.max_hp[None].clone(), sim.max_sh[None].clone()
    return raw_from_sim(sim)


# --- geometry ------------------------------------------------------------------------------------------
def through_pysc2(raw_resolution, map_size, unit_type, world, *, radius: float, health: int):
    """Own units of one type at world points, turned into raw_units by pysc2's own transform_obs:
    (its Features, for the action side too; the raw_units array)."""
    aif = sc2_env.AgentInterfaceFormat(use_raw_units=True, use_raw_actions=True, raw_resolution=raw_resolution,
                                       action_space=actions.ActionSpace.RAW)
    feats = features.Features(aif, map_size=point.Point(*map_size))
    units = [dummy_observation.FeatureUnit(unit_type, 1, owner=1, pos=common_pb2.Point(x=x, y=y, z=0),
                                           radius=radius, health=health, health_max=health, is_on_screen=True)
             for x, y in world]
    obs = feats.transform_obs(dummy_observation.Builder(feats.observation_spec()).feature_units(units).build())
    return feats, obs["raw_units"]


def test_geometry_matches_pysc2_transforms():
    """Observation side through pysc2's own transform_obs, action side through its transform_action."""
    world = [(10.3, 20.7), (23.9, 4.05)]
    feats, raw = through_pysc2(256, (32, 32), Terran.Marine, world, radius=0.375, health=45)
    got = GEO.to_map(raw[:, [FeatureUnit.x, FeatureUnit.y]])
    assert np.abs(got - np.array(world)).max() <= 1 / 16 + 1e-9  # half a raw cell
    target = np.array([10.3125, 20.6875])  # a raw cell centre: exact both ways
    call = RAW.Move_pt("now", [TAG0], GEO.to_raw(target).tolist())
    act = feats.transform_action(None, call, skip_available=True).action_raw.unit_command
    assert (act.target_world_space_pos.x, act.target_world_space_pos.y) == tuple(target)
    shifted = RawGeometry((48.0, 48.0), None, origin=(16.0, 8.0))  # one cell per map unit, offset frame
    np.testing.assert_allclose(shifted.to_map(shifted.to_raw([[3.5, 7.5]])), [[3.5, 7.5]])


# --- raw units -> features -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, dead", [("3m", (2, 4)), ("MMM", (3, 11, 19))])
def test_features_equal_the_simulator(name, dead):
    sim = random_battle(name, seed=1, dead=dead)
    conv = RawConverter(sim.scenario, GEO)
    conv.assign(full_raw(name))
    out = conv.observe(raw_from_sim(sim, shuffle_seed=5), last_actions=sim.last_actions[0])
    A = sim.n_agents
    assert out.obs.shape == (1, A, sim.scenario.obs_size) and out.state.shape == (1, sim.scenario.state_size)
    assert torch.equal(out.obs, sim.obs) and torch.equal(out.state, sim.state) and torch.equal(out.avail, sim.avail)
    assert torch.equal(out.alive, sim.alive[:, :A])
    own = -sim.scenario.own_feature_size  # SMAC's own features start with health / max health
    for a in range(A):
        assert out.obs[0, a, own].item() == pytest.approx(sim.hp[0, a].item() / sim.scenario.agents[a].health)
    for d in dead:
        if d < A:  # a dead agent: zero observation, only the no-op
            assert not out.obs[0, d].any() and out.avail[0, d].tolist() == [True] + [False] * (sim.n_actions - 1)
    assert out.avail.any(2).all() and not out.avail[0, [a for a in range(A) if a not in dead], 0].any()


def test_slots_by_type_then_tag_and_dead_keep_their_slot():
    sc = load_scenario("MMM")  # agents: medivac, 2 marauders, 7 marines (same for enemies)
    raw = full_raw("MMM")
    conv = RawConverter(sc, GEO)
    conv.assign(raw)
    assert conv.tags.tolist() == [TAG0 + 3 * i for i in range(20)]
    types = {int(r[FeatureUnit.tag]): int(r[FeatureUnit.unit_type]) for r in raw}
    assert [types[t] for t in conv.tags[:10]] == [Terran.Medivac] + [Terran.Marauder] * 2 + [Terran.Marine] * 7
    # the second marauder (slot 2) and the first enemy marine (slot 13) die: their slots stay, zeroed
    later = raw[~np.isin(raw[:, FeatureUnit.tag], [TAG0 + 3 * 2, TAG0 + 3 * 13])]
    out = conv.observe(later)
    assert conv.tags.tolist() == [TAG0 + 3 * i for i in range(20)]
    assert out.alive[0].tolist() == [True, True, False] + [True] * 7
    assert not out.obs[0, 2].any()
    ally_state = 4 + sc.type_bits
    assert not out.state[0, 2 * ally_state:3 * ally_state].any()
    enemy_state = 3 + sc.type_bits
    e3 = 10 * ally_state + 3 * enemy_state
    assert not out.state[0, e3:e3 + enemy_state].any() and out.state[0, e3 + enemy_state:].any()
    assert not out.avail[0, 1:, 6 + 3].any()  # nobody may attack the dead enemy marine (agent 0 heals)


def test_smac_custom_ally_type_ids():
    sc = load_scenario("MMM")
    custom = smac_ally_unit_types(sc, 1970)
    assert custom == {1970: "marauder", 1971: "marine", 1972: "medivac"}  # SMAC: alphabetical from the min id
    raw = raw_from_sim(random_battle("MMM", 0, ()), type_ids={v: k for k, v in custom.items()})
    conv = RawConverter(sc, GEO)
    conv.assign(raw)
    assert conv.tags.tolist() == [TAG0 + 3 * i for i in range(20)]


def test_unknown_and_mismatched_units_give_clear_errors():
    sc = load_scenario("3m")
    raw = full_raw("3m")
    bad = raw.copy()
    bad[bad[:, FeatureUnit.tag] == TAG0 + 3 * 4, FeatureUnit.unit_type] = 9999  # an enemy
    with pytest.raises(SlotError, match=r"enemy unit .*type id 9999.*unit_types=\{9999"):
        RawConverter(sc, GEO).assign(bad)
    own = raw.copy()
    own[own[:, FeatureUnit.tag] == TAG0, FeatureUnit.unit_type] = 9999
    with pytest.raises(SlotError, match=r"own unit .*9999"):
        RawConverter(sc, GEO, smac_ally_types=False).assign(own)
    zealot = raw.copy()
    zealot[zealot[:, FeatureUnit.tag] == TAG0 + 3 * 3, FeatureUnit.unit_type] = Protoss.Zealot
    with pytest.raises(SlotError, match=r"is a zealot .*3m's enemies are marine"):
        RawConverter(sc, GEO).assign(zealot)
    with pytest.raises(SlotError, match=r"own units: scenario 3m expects 3 marine, the game has 2 marine"):
        RawConverter(sc, GEO).assign(raw[raw[:, FeatureUnit.tag] != TAG0])
    conv = RawConverter(sc, GEO, unit_types={9999: "marine"})
    conv.assign(bad)  # a user table fixes it


def test_a_unit_missing_from_a_frame_is_dead_in_it_and_its_death_tracked():
    """A unit gone from raw_units is dead in that frame and its death is tracked for the episode; should its tag
    show up again (an enemy out of sight under fog of war, then back) it is alive and targetable again, as in
    SMAC; a new episode (assign) clears the tracker."""
    sc = load_scenario("3m")
    raw = full_raw("3m")
    e0 = TAG0 + 9  # enemy slot 0 (unit 3)
    conv = RawConverter(sc, GEO)
    conv.assign(raw)
    gone = conv.observe(raw[raw[:, FeatureUnit.tag] != e0])
    enemy_state = 3 + sc.type_bits
    e_first = sc.n_agents * (4 + sc.type_bits)
    assert not conv.sim.alive[0, 3] and not gone.state[0, e_first:e_first + enemy_state].any()
    assert conv.dead.tolist() == [False, False, False, True, False, False]
    back = conv.observe(raw)
    assert conv.sim.alive[0, 3] and back.state[0, e_first:e_first + enemy_state].any()
    assert conv.dead[3]  # its death stays tracked (no second kill reward)
    conv.assign(raw)  # the next episode
    assert not conv.dead.any()


def test_truncated_zero_health_unit_is_alive():
    """pysc2 truncates health to an integer: a unit with under 1 HP reads 0 but is in raw_units, so alive."""
    sc = load_scenario("3m")
    raw = full_raw("3m")
    conv = RawConverter(sc, GEO)
    conv.assign(raw)
    low = raw.copy()
    low[np.isin(low[:, FeatureUnit.tag], [TAG0, TAG0 + 9]), FeatureUnit.health] = 0  # agent 0, enemy slot 0
    out = conv.observe(low)
    assert out.alive[0].all() and conv.sim.alive[0, 3]
    assert out.avail[0, 0, 1] and not out.avail[0, 0, 0]  # agent 0 acts (no-op is for the dead)
    own_health = out.obs[0, 0, -sc.own_feature_size].item()
    assert 0.0 < own_health < 1.0 / 45  # some health, less than 1 HP


def test_new_tags_are_ignored_and_a_mutual_wipe_is_a_draw():
    """SMAC's maps respawn both armies once all units are gone, so new tags can come in the very frame in
    which every old one vanished: they are ignored, and the episode ends neither won nor timed out."""
    sc = load_scenario("3m")
    start = full_raw("3m")
    conv = RawConverter(sc, GEO)
    conv.assign(start)
    extra = np.concatenate([start, unit_row(Terran.Marine, 4, TAG0 + 999, (100, 100), 45)[None]])
    assert conv.observe(extra).alive[0].all()  # a unit outside the slots does not disturb them
    respawned = start.copy()
    respawned[:, FeatureUnit.tag] += 1  # the same armies with new tags
    env = ScriptedEnv([start, respawned])
    battle = SC2Battle(sc, env, auto_reset=False)
    out = battle.reset()
    out = battle.step(torch.where(out.avail[0, :, 1], 1, 0)[None])
    assert out.done.item() and not out.won.item() and not out.timeout.item()
    assert out.allies_left.item() == 0 and out.enemies_left.item() == 0
    enemy_hp = sum(u.health for u in sc.enemies)  # every enemy died from full health: damage and kills count
    assert out.reward.item() == pytest.approx((enemy_hp + 10.0 * sc.n_enemies) / (sc.max_reward / 20.0))


# --- policy actions -> raw commands --------------------------------------------------------------------
def test_actions_to_raw_function_calls():
    sim = random_battle("3m", seed=2, dead=(4,))
    conv = RawConverter(sim.scenario, GEO)
    conv.assign(full_raw("3m"))
    out = conv.observe(raw_from_sim(sim))
    # agent 0 stops, agent 1 moves north, agent 2 attacks the first enemy it may
    k = int(torch.nonzero(out.avail[0, 2, 6:])[0])
    assert k != 1  # enemy slot 1 (unit 4) is dead
    stop, move, attack = conv.to_raw_actions([1, 2, 6 + k])
    assert stop.function == RAW.Stop_quick.id and stop.arguments == [[actions.Queued.now], [TAG0]]
    assert move.function == RAW.Move_pt.id and move.arguments[1] == [TAG0 + 3]
    goal = sim.pos[0, 1].numpy() + np.array([0.0, 2.0])
    np.testing.assert_allclose(GEO.to_map(np.array(move.arguments[2])), goal, atol=1e-6)
    assert attack.function == RAW.Attack_unit.id and attack.arguments[1:] == [[TAG0 + 6], [TAG0 + 3 * (3 + k)]]
    south, east, west = (conv.to_raw_actions([0, a, 0], check=False)[0] for a in (3, 4, 5))
    for call, d in ((south, (0, -2)), (east, (2, 0)), (west, (-2, 0))):
        np.testing.assert_allclose(GEO.to_map(np.array(call.arguments[2])), sim.pos[0, 1].numpy() + d, atol=1e-6)
    assert conv.to_raw_actions([0, 0, 0], check=False) == []
    with pytest.raises(IllegalActionError, match="masked out"):
        conv.to_raw_actions([0, 1, 1])  # no-op is only for the dead
    with pytest.raises(IllegalActionError, match="masked out"):
        conv.to_raw_actions([1, 1, 6 + 1])  # enemy slot 1 is dead


def test_medivac_heals_ally_slots_and_dead_agents_send_nothing():
    sim = random_battle("MMM", seed=3, dead=(9,))
    sim.pos[0, :10] = torch.tensor(GEO.to_map(GEO.to_raw(np.array([[10.0 + i % 3, 14.0 + i // 3] for i in range(10)]))))
    sim.refresh()
    conv = RawConverter(sim.scenario, GEO)
    conv.assign(full_raw("MMM"))
    out = conv.observe(raw_from_sim(sim))
    assert torch.equal(out.avail, sim.avail)
    assert out.avail[0, 0, 6 + 1] and not out.avail[0, 0, 6 + 0]  # heal marauder 1, never itself
    acts = torch.where(out.avail[0, :, 1], 1, 0)
    acts[0] = 6 + 1
    calls = conv.to_raw_actions(acts.tolist())
    assert calls[0].function == RAW.Effect_Heal_unit.id and calls[0].arguments[1:] == [[TAG0], [TAG0 + 3]]
    assert len(calls) == 9  # agent 9 is dead
    assert RAW.Effect_Heal_unit.ability_id == 386 and RAW.Attack_unit.ability_id == 3674


# --- SC2Battle over pysc2's mock env -------------------------------------------------------------------
class ScriptedEnv:
    """pysc2's SC2TestEnv whose raw_units follow a script: frame i after the i-th step of an episode.

    map_size: the game's map (`game_info.start_raw.map_size`; the mock's own is 256 x 256), raw_resolution
    the raw grid; episode_length: steps until the mock's own TimeStep says LAST."""

    def __init__(self, frames: list[np.ndarray], map_size=(32, 32), raw_resolution=256, episode_length=10):
        aif = sc2_env.AgentInterfaceFormat(use_raw_units=True, use_raw_actions=True,
                                           raw_resolution=raw_resolution, action_space=actions.ActionSpace.RAW)
        self.mock = mock_sc2_env.SC2TestEnv(
            map_name="3m", players=[sc2_env.Agent(sc2_env.Race.terran),
                                    sc2_env.Bot(sc2_env.Race.terran, sc2_env.Difficulty.very_hard)],
            agent_interface_format=aif)
        self.mock.episode_length = episode_length
        size = self.mock.game_info[0].start_raw.map_size
        size.x, size.y = map_size
        self.frames, self.i, self.sent = frames, 0, []
        self.game_info, self.action_spec = self.mock.game_info, self.mock.action_spec

    def _load(self):
        ts = self.mock.next_timestep[0]
        ts.observation["raw_units"] = named_array.NamedNumpyArray(
            self.frames[min(self.i, len(self.frames) - 1)], [None, FeatureUnit], dtype=np.int64)

    def reset(self):
        self.i = 0
        self._load()
        return self.mock.reset()

    def step(self, acts):
        self.sent.append(acts)
        self.i += 1
        self._load()
        return self.mock.step(acts)

    def close(self):
        pass


def _hit(raw, tag, health):
    out = raw.copy()
    out[out[:, FeatureUnit.tag] == tag, FeatureUnit.health] = health
    return out[out[:, FeatureUnit.health] > 0]


def test_sc2battle_reward_from_damage_kills_and_win():
    sc = load_scenario("3m")
    start = full_raw("3m")
    hp = {int(r[FeatureUnit.tag]): int(r[FeatureUnit.health]) for r in start}
    e0, e1, e2 = TAG0 + 9, TAG0 + 12, TAG0 + 15
    f1 = _hit(start, e0, hp[e0] - 10)  # 10 damage
    f2 = _hit(f1, e1, 0)  # a kill
    f3 = _hit(_hit(f2, e0, 0), e2, 0)  # the last two: a win
    not_yet = start[start[:, FeatureUnit.alliance] != 1]  # our units have not spawned yet
    env = ScriptedEnv([not_yet, start, f1, f2, f3])
    battle = SC2Battle(sc, env)
    assert battle.conv.geometry == GEO  # read from the env
    out = battle.reset()
    assert len(env.sent) == 1 and env.sent[0] == [[]]  # one no-op step waiting for our units
    assert out.obs.shape == (1, 3, sc.obs_size) and out.avail[0, :, 1].all()
    scale = sc.max_reward / 20.0
    expected = [10.0, hp[e1] + 10.0, (hp[e0] - 10) + hp[e2] + 20.0 + 200.0]
    total = 0.0
    for i, r in enumerate(expected):
        acts = torch.where(out.avail[0, :, 1], 1, 0)[None]
        out = battle.step(acts)
        total += r / scale
        assert out.reward.item() == pytest.approx(r / scale)
        assert out.episode_return.item() == pytest.approx(total) and out.episode_length.item() == i + 1
        assert out.done.item() == (i == 2)
    assert out.won.item() and not out.timeout.item() and out.enemies_left.item() == 0 and out.allies_left.item() == 3
    assert [c.function for c in env.sent[-2][0]] == [RAW.Stop_quick.id] * 3
    assert env.sent[-1] == [[]]  # auto-reset: the next episode waits for our units again
    assert battle.t == 0 and out.avail[0, :, 1].all()  # auto-reset: obs of the next episode
    assert total == pytest.approx(20.0)  # every enemy killed from full health: SMAC's best return


def test_sc2battle_game_end_is_a_timeout_loss():
    sc = load_scenario("3m")
    env = ScriptedEnv([full_raw("3m")])  # nothing happens; the mock ends its episode after 10 steps
    battle = SC2Battle(sc, env, geometry=GEO, auto_reset=False)
    out = battle.reset()
    for i in range(10):
        out = battle.step(torch.where(out.avail[0, :, 1], 1, 0)[None])
        assert out.done.item() == (i == 9) and out.reward.item() == 0.0
    assert out.timeout.item() and not out.won.item() and out.episode_length.item() == 10
    with pytest.raises(ValueError, match=r"shape \(1, n_agents\)"):
        battle.step(torch.zeros(3, dtype=torch.int64))


def test_sc2battle_dead_unit_reappearing_is_not_killed_twice():
    sc = load_scenario("3m")
    start = full_raw("3m")
    hp = {int(r[FeatureUnit.tag]): int(r[FeatureUnit.health]) for r in start}
    e0, e1, e2 = TAG0 + 9, TAG0 + 12, TAG0 + 15
    gone = start[start[:, FeatureUnit.tag] != e0]
    all_dead = start[~np.isin(start[:, FeatureUnit.tag], [e0, e1, e2])]
    env = ScriptedEnv([start, gone, start, gone, all_dead])
    battle = SC2Battle(sc, env, auto_reset=False)
    out = battle.reset()
    scale = sc.max_reward / 20.0
    expected = [hp[e0] + 10.0, 0.0, 0.0, hp[e1] + hp[e2] + 20.0 + 200.0]  # e0's kill counted once
    for i, r in enumerate(expected):
        out = battle.step(torch.where(out.avail[0, :, 1], 1, 0)[None])
        assert out.reward.item() == pytest.approx(r / scale), f"step {i + 1}"
        assert out.done.item() == (i == 3)
        assert out.enemies_left.item() == [2, 3, 2, 0][i]  # back in sight at step 2: alive again
    assert out.won.item()


def test_sc2battle_loss_when_our_army_is_gone():
    sc = load_scenario("3m")
    start = full_raw("3m")
    e0 = TAG0 + 9
    ours_dead = _hit(start[start[:, FeatureUnit.alliance] != 1], e0, int(sc.enemies[0].health) - 10)
    battle = SC2Battle(sc, ScriptedEnv([start, ours_dead]), auto_reset=False)
    out = battle.reset()
    out = battle.step(torch.where(out.avail[0, :, 1], 1, 0)[None])
    assert out.done.item() and not out.won.item() and not out.timeout.item()
    assert out.allies_left.item() == 0 and out.enemies_left.item() == 3
    assert out.reward.item() == pytest.approx(10.0 / (sc.max_reward / 20.0))  # no win bonus; damage still counts
    assert not out.avail[0, :, 1:].any()  # dead agents may only no-op


def test_sc2battle_only_healers_left_ends_the_battle():
    """Only medivacs left is a dead army (SMAC's only_medivac_left): theirs is our win, ours our loss."""
    sc = load_scenario("MMM")  # slot 0 of each side is its medivac
    start = full_raw("MMM")
    enemy_fighters = [TAG0 + 3 * i for i in range(11, 20)]
    only_their_medivac = start[~np.isin(start[:, FeatureUnit.tag], enemy_fighters)]
    battle = SC2Battle(sc, ScriptedEnv([start, only_their_medivac]), auto_reset=False)
    out = battle.reset()
    out = battle.step(torch.where(out.avail[0, :, 1], 1, 0)[None])
    fighters_hp = sum(u.health for u in sc.enemies[1:])
    assert out.done.item() and out.won.item() and out.enemies_left.item() == 1
    assert out.reward.item() == pytest.approx((fighters_hp + 90.0 + 200.0) / (sc.max_reward / 20.0))
    our_fighters = [TAG0 + 3 * i for i in range(1, 10)]
    battle = SC2Battle(sc, ScriptedEnv([start, start[~np.isin(start[:, FeatureUnit.tag], our_fighters)]]),
                       auto_reset=False)
    out = battle.reset()
    out = battle.step(torch.where(out.avail[0, :, 1], 1, 0)[None])
    assert out.done.item() and not out.won.item() and not out.timeout.item() and out.allies_left.item() == 1


def test_sc2battle_episode_limit_is_a_timeout_loss():
    sc = load_scenario("3m")
    env = ScriptedEnv([full_raw("3m")], episode_length=10 * sc.episode_limit)  # the game itself goes on
    battle = SC2Battle(sc, env, auto_reset=False)
    out = battle.reset()
    for i in range(sc.episode_limit):
        out = battle.step(torch.where(out.avail[0, :, 1], 1, 0)[None])
        assert out.done.item() == (i == sc.episode_limit - 1)
    assert out.timeout.item() and not out.won.item() and out.episode_length.item() == sc.episode_limit


def test_sc2battle_reward_ignores_enemy_healing():
    """Health an enemy gains (medivac heals, regeneration) is not negative reward: each enemy's loss is
    clamped at zero before summing, as in the simulator (engine.py)."""
    sc = load_scenario("MMM")
    start = full_raw("MMM")
    m1, m2 = TAG0 + 3 * 13, TAG0 + 3 * 14  # two enemy marines
    full = int(sc.enemies[3].health)
    hurt = _hit(start, m1, full - 20)
    healed = _hit(hurt, m1, full - 15)  # +5 HP, nothing else
    healed_and_hit = _hit(_hit(healed, m1, full - 10), m2, full - 10)  # +5 HP on one, -10 HP on another
    battle = SC2Battle(sc, ScriptedEnv([start, hurt, healed, healed_and_hit]), auto_reset=False)
    out = battle.reset()
    scale = sc.max_reward / 20.0
    for r in (20.0, 0.0, 10.0):
        out = battle.step(torch.where(out.avail[0, :, 1], 1, 0)[None])
        assert out.reward.item() == pytest.approx(r / scale)


# --- the real game's set-up, without the game --------------------------------------------------------
MIXED = """
[scenarios.stalkers_vs_zerglings]
map = [40, 24]
episode_limit = 50
agents = [{ unit = "stalker", count = 2 }]
enemies = [{ unit = "zergling", count = 4 }]
agent_spawn = [9, 12]
enemy_spawn = [31, 12]
"""


@pytest.fixture
def mixed(tmp_path):
    """A scenario whose teams are of different races, on a map wider than high."""
    path = tmp_path / "mixed.toml"
    path.write_text(MIXED)
    return load_scenario("stalkers_vs_zerglings", [path])


def test_make_sc2_env_arguments(mixed, monkeypatch):
    """What make_sc2_env asks pysc2 for, captured instead of starting the game."""
    got = {}

    def fake_env(**kwargs):
        got.update(kwargs)
        return "env"

    monkeypatch.setattr(sc2_env, "SC2Env", fake_env)
    from trainer.sc2 import make_sc2_env

    assert make_sc2_env(mixed, seed=5) == "env"
    agent, bot = got["players"]
    assert isinstance(agent, sc2_env.Agent) and agent.race == [sc2_env.Race.protoss]
    assert isinstance(bot, sc2_env.Bot) and bot.race == [sc2_env.Race.zerg]
    assert bot.difficulty == sc2_env.Difficulty.very_hard and int(bot.difficulty) == 7  # SMAC's "7"
    assert got["map_name"].filename == "stalkers_vs_zerglings" and got["map_name"].directory == "SMAC_Maps"
    assert got["step_mul"] == 8 and got["random_seed"] == 5 and got["game_steps_per_episode"] == 0
    assert got["disable_fog"] is False  # SMAC plays with fog of war
    aif = got["agent_interface_format"]
    assert aif.use_raw_units and aif.use_raw_actions and tuple(aif.raw_resolution) == (320, 320)  # 8 x 40
    make_sc2_env(mixed, map_name="other", difficulty="easy", step_mul=4)
    assert got["players"][1].difficulty == sc2_env.Difficulty.easy
    assert got["map_name"].filename == "other" and got["step_mul"] == 4


def test_geometry_from_env_on_a_non_square_map(mixed):
    """Map size x, y read the right way round, checked against the scenario, and equal to pysc2's transform."""
    from trainer.sc2 import geometry_from_env

    env = ScriptedEnv([], map_size=(40, 24), raw_resolution=(320, 192))  # a non-square grid too
    geo = geometry_from_env(env, scenario=mixed)
    assert geo == RawGeometry((40.0, 24.0), (320, 192))
    world = [(30.3, 5.2), (4.9, 20.7)]
    feats, raw = through_pysc2((320, 192), (40, 24), Protoss.Stalker, world, radius=0.625, health=80)
    got = geo.to_map(raw[:, [FeatureUnit.x, FeatureUnit.y]])
    assert (np.abs(got - np.array(world)) <= 0.5 / geo.scale + 1e-9).all()  # half a raw cell
    with pytest.raises(ValueError, match=r"40 x 24.*3m.*32 x 32"):
        geometry_from_env(env, scenario=load_scenario("3m"))
    with pytest.raises(ValueError, match=r"40 x 24"):
        SC2Battle(load_scenario("3m"), env)  # SC2Battle checks too


@pytest.mark.parametrize("player", ["model", "focus-fire"])
def test_phalanx_eval_in_the_game_plays_episode_after_episode(player):
    """`phalanx eval --env sc2` in miniature: two episodes in one game, each won on its second step, played by a
    model (the simulator-trained policy's act) or a scripted baseline reading the simulator mirror of the frame;
    the result has evaluate()'s keys."""
    from trainer.policy import Policy
    from trainer.sc2.battle import evaluate_in_game

    sc = load_scenario("3m")
    start = full_raw("3m")
    e0, e1, e2 = TAG0 + 9, TAG0 + 12, TAG0 + 15
    hurt = _hit(start, e0, 5)
    won = start[~np.isin(start[:, FeatureUnit.tag], [e0, e1, e2])]
    env = ScriptedEnv([start, hurt, won])
    torch.manual_seed(0)
    policy = Policy.for_scenario(sc, agent_id=True) if player == "model" else None
    result = evaluate_in_game(policy, sc, 2, baseline=None if player == "model" else player,
                              battle=SC2Battle(sc, env, auto_reset=False))
    assert result == {"env": "sc2", "win_rate": 1.0, "episodes": 2, "mean_return": pytest.approx(20.0),
                      "mean_length": 2.0, "mean_allies_left": 3.0, "mean_enemies_left": 0.0, "timeouts": 0}
    commands = [call for step in env.sent for call in step[0]]  # one list of calls per player
    assert len(env.sent) == 4 and len(commands) == 12  # 2 episodes x 2 steps x 3 units, every one a legal command
    if player == "focus-fire":  # closing in, then every marine on the same enemy
        assert {c.function for c in commands} <= {RAW.Move_pt.id, RAW.Attack_unit.id}
        for step in env.sent:
            targets = {int(c.arguments[2][0]) for c in step[0] if c.function == RAW.Attack_unit.id}
            assert len(targets) <= 1


def test_phalanx_play_in_the_game_logs_its_episodes_for_the_offline_trainer(tmp_path):
    """`phalanx play --env sc2` in miniature: a served model plays two episodes of one (mock) real game, each won
    on its second step; the service's experience log gets both episodes' trajectories, rewards and ends, as
    the offline trainer reads them."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from service.client import AsyncClient
    from service.play import play_in_game
    from service.server import ServeConfig, start_server
    from trainer.policy import Policy
    from trainer.repository import ModelRepository
    from trainer.shards import read_shards

    sc = load_scenario("3m")
    torch.manual_seed(0)
    ModelRepository(tmp_path / "models").save("m", Policy.for_scenario(sc, agent_id=True), scenario=sc, step=0,
                                              eval_win_rate=None)
    start = full_raw("3m")
    e0, e1, e2 = TAG0 + 9, TAG0 + 12, TAG0 + 15
    env = ScriptedEnv([start, _hit(start, e0, 5), start[~np.isin(start[:, FeatureUnit.tag], [e0, e1, e2])]])

    async def main():
        config = ServeConfig(models=tmp_path / "models", name="m", port=0, poll_seconds=0.0, grace_seconds=5.0,
                             experience_dir=tmp_path / "exp")
        running = await start_server(config, CollectorRegistry())
        try:
            async with AsyncClient(running.address, timeout=10) as client:  # as `phalanx play --env sc2` does
                return await play_in_game(client, sc, SC2Battle(sc, env, auto_reset=False), episodes=2, rpc="stream")
        finally:
            await running.stop(grace=1)

    real_reset, resets = env.reset, []
    env.reset = lambda: resets.append(1) or real_reset()
    result = asyncio.run(main()).summary()
    assert (result["episodes"], result["win_rate"], result["units"]) == (2, 1.0, 12)  # 2 x 2 steps x 3 units
    assert len(resets) == 2  # one new game per episode (each reset reloads the map in the real game)
    assert result["mean_return"] == pytest.approx(20.0)
    logged = read_shards(tmp_path / "exp", spec_hash=sc.spec_hash)
    # the 12 played steps, each with its reward (the last of each unit's episode closed by prev_done), and the 6
    # closing requests' own steps, never played, which only bootstrap
    assert logged.rows == 18 and int(logged.sample.sum()) == 12
    assert int(logged.done.sum()) == 6  # each unit's episode ended, twice
    assert float(logged.reward[logged.sample].sum()) == pytest.approx(3 * 2 * 20.0)  # every unit gets the team's
