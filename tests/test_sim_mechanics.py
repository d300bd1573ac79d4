"""The simulator's mechanics, each checked exactly in a hand-placed duel."""

import math

import pytest
import torch

from trainer.sim import BattleSim, IllegalActionError, load_scenario
from trainer.sim.scenario import LOOPS_PER_SECOND, LOOPS_PER_STEP

# A target that never moves and never hits back: health to spare, speed 0, tiny range.
DUMMY = """
[units.dummy]
race = "other"
health = 10000
damage = 0.001
range = 0.1
speed = 0
radius = 0.5
attributes = ["armored"]

[units.light_dummy]
race = "other"
health = 10000
damage = 0.001
range = 0.1
speed = 0
radius = 0.5
attributes = ["light"]

[units.shield_dummy]
race = "protoss"
health = 10000
shield = 50
armor = 1
damage = 0.001
range = 0.1
speed = 0
radius = 0.5
attributes = ["armored"]
"""

STOP, NORTH, SOUTH, EAST, WEST = 1, 2, 3, 4, 5


def duel(tmp_path, agents: str, enemies: str, limit: int = 100, extra: str = "") -> BattleSim:
    """A scenario on a 32x32 map with no start jitter; units placed by `place`."""
    f = tmp_path / "duel.toml"
    f.write_text(DUMMY + extra + f"""
[scenarios.duel]
map = [32, 32]
episode_limit = {limit}
agents = {agents}
enemies = {enemies}
agent_spawn = [10, 16]
enemy_spawn = [22, 16]
jitter = 0
""")
    return BattleSim(load_scenario("duel", [f]), 1, seed=0)


def place(sim: BattleSim, *xy):
    for u, (x, y) in enumerate(xy):
        sim.pos[0, u] = torch.tensor([float(x), float(y)])
    sim.refresh()


def attack(sim, k):
    return torch.tensor([[6 + k]])


def test_damage_after_armor_and_bonus(tmp_path):
    # marauder: 10 (+10 vs armored). A light marine takes 10, an armored dummy 20.
    sim = duel(tmp_path, '[{unit="marauder", count=1}]', '[{unit="marine", count=1}, {unit="dummy", count=1}]')
    place(sim, (10, 16), (14, 16), (10, 20))
    sim.step(attack(sim, 0))
    assert sim.hp[0, 1].item() == pytest.approx(45 - 10)
    # the marine shot back: 6 minus the marauder's armor 1
    assert sim.hp[0, 0].item() == pytest.approx(125 - 5)
    sim.cooldown.zero_()
    sim.step(attack(sim, 1))
    assert sim.hp[0, 2].item() == pytest.approx(10000 - 20)


def test_multi_hit_attack_applies_armor_per_hit(tmp_path):
    sim = duel(tmp_path, '[{unit="zealot", count=1}]', '[{unit="marauder", count=1}]')
    place(sim, (10, 16), (11.2, 16))  # edge distance 1.2 - 0.5 - 0.5625 = 0.1375 > melee 0.1: closes in first
    sim.step(attack(sim, 0))
    assert sim.hp[0, 1].item() == 125  # no hit yet: the zealot walked into range
    sim.step(attack(sim, 0))
    assert sim.hp[0, 1].item() == pytest.approx(125 - 2 * (8 - 1))


def test_shields_absorb_first_then_armor_on_the_overflow(tmp_path):
    sim = duel(tmp_path, '[{unit="zealot", count=1}]', '[{unit="shield_dummy", count=1}]')
    place(sim, (10, 16), (11, 16))
    sim.sh[0, 1] = 5.0
    sim.refresh()
    sim.step(attack(sim, 0))
    # hit 1 (8): 5 to shields, 3 - armor 1 = 2 to health; hit 2 (8): 7 to health
    assert sim.sh[0, 1].item() == 0
    assert sim.hp[0, 1].item() == pytest.approx(10000 - 9)
    # a full shield takes the whole attack with no armor reduction
    sim.sh[0, 1] = 50.0
    sim.cooldown.zero_()
    sim.step(attack(sim, 0))
    assert sim.sh[0, 1].item() == pytest.approx(50 - 16)


def test_shield_regenerates_after_ten_seconds_unhurt(tmp_path):
    sim = duel(tmp_path, '[{unit="marine", count=1}]', '[{unit="shield_dummy", count=1}]')
    place(sim, (10, 16), (30, 30))  # out of sight and range
    sim.sh[0, 1] = 10.0
    sim.since_hit[0, 1] = 0.0
    steps_to_wait = math.ceil(10 * LOOPS_PER_SECOND / LOOPS_PER_STEP)  # 28 steps of 8 loops = 224 loops
    for _ in range(steps_to_wait):
        sim.step(torch.tensor([[STOP]]))
    assert sim.sh[0, 1].item() == 10.0  # nothing before 10 s
    sim.step(torch.tensor([[STOP]]))
    per_step = 2.0 * LOOPS_PER_STEP / LOOPS_PER_SECOND
    assert sim.sh[0, 1].item() == pytest.approx(10.0 + per_step)


def test_cooldown_limits_the_rate_of_fire(tmp_path):
    sim = duel(tmp_path, '[{unit="marine", count=1}]', '[{unit="dummy", count=1}]', limit=1000)
    place(sim, (10, 16), (14, 16))
    steps = 28  # 224 game loops
    for _ in range(steps):
        sim.step(attack(sim, 0))
    cooldown_loops = 0.61 * LOOPS_PER_SECOND  # 13.664 loops between shots
    shots = math.floor((steps * LOOPS_PER_STEP - 1e-9) / cooldown_loops) + 1  # shots at 0, cd, 2cd, ... < 224
    assert shots == 17
    assert sim.hp[0, 1].item() == pytest.approx(10000 - 6 * shots)


def test_out_of_range_attack_order_closes_in_then_fires(tmp_path):
    sim = duel(tmp_path, '[{unit="marine", count=1}]', '[{unit="dummy", count=1}]')
    # centre distance 6 (legal to order, shoot range 6); edge distance 6 - 0.375 - 0.5 = 5.125 > range 5
    place(sim, (10, 16), (16, 16))
    assert sim.avail[0, 0, 6]
    sim.step(attack(sim, 0))
    assert sim.hp[0, 1].item() == 10000  # walked, did not fire
    assert sim.pos[0, 0, 0].item() == pytest.approx(10.125, abs=1e-4)  # stops exactly at weapon range
    sim.step(attack(sim, 0))
    assert sim.hp[0, 1].item() == pytest.approx(10000 - 6)


def test_attack_mask_uses_shoot_range_and_living_targets(tmp_path):
    sim = duel(tmp_path, '[{unit="marine", count=1}]', '[{unit="dummy", count=1}, {unit="dummy", count=1}]')
    place(sim, (10, 16), (16.0, 16), (16.01, 17))
    assert sim.avail[0, 0].tolist() == [False, True, True, True, True, True, True, False]
    sim.alive[0, 1] = False
    sim.refresh()
    assert not sim.avail[0, 0, 6]
    with pytest.raises(IllegalActionError, match="masked out"):
        sim.step(attack(sim, 0))


def test_death_zeroes_observation_and_allows_only_noop(tmp_path):
    sim = duel(tmp_path, '[{unit="marine", count=2}]', '[{unit="marauder", count=1}]')
    place(sim, (10, 16), (10, 17), (14, 16))
    sim.hp[0, 0] = 1.0
    sim.refresh()
    out = sim.step(torch.tensor([[STOP, STOP]]))  # the marauder shoots the weakest... or nearest: agent 0
    assert not out.alive[0, 0]
    assert sim.hp[0, 0].item() == 0
    assert out.avail[0, 0].tolist() == [True] + [False] * (out.avail.shape[2] - 1)
    assert torch.all(out.obs[0, 0] == 0)
    with pytest.raises(IllegalActionError):
        sim.step(torch.tensor([[STOP, STOP]]))
    sim.step(torch.tensor([[0, STOP]]))


def test_medivac_heals_an_ally_and_spends_energy(tmp_path):
    # two enemies, so the medivac has two target slots (SMAC: n_actions = 6 + n_enemies)
    sim = duel(tmp_path, '[{unit="medivac", count=1}, {unit="marine", count=1}]', '[{unit="dummy", count=2}]')
    place(sim, (10, 16), (11, 16), (30, 30), (30, 29))
    sim.hp[0, 1] = 20.0
    sim.refresh()
    energy = sim.energy[0, 0].item()
    sim.step(torch.tensor([[6 + 1, STOP]]))  # heal ally slot 1
    per_step = 12.6 * LOOPS_PER_STEP / LOOPS_PER_SECOND  # 4.5 HP
    assert sim.hp[0, 1].item() == pytest.approx(20 + per_step)
    regen = 0.7875 * LOOPS_PER_STEP / LOOPS_PER_SECOND
    assert sim.energy[0, 0].item() == pytest.approx(energy - per_step * 0.3333333 + regen, abs=1e-4)
    # a medivac cannot target itself or another medivac, and a full-health ally is not over-healed
    assert not sim.avail[0, 0, 6]
    sim.hp[0, 1] = 45.0
    sim.step(torch.tensor([[6 + 1, STOP]]))
    assert sim.hp[0, 1].item() == 45.0


def test_baneling_splash_hits_everyone_nearby_and_kills_the_baneling(tmp_path):
    # a marine far away keeps the game going once the baneling is gone
    sim = duel(tmp_path, '[{unit="baneling", count=1}, {unit="marine", count=1}]',
               '[{unit="light_dummy", count=1}, {unit="light_dummy", count=1}, {unit="dummy", count=1}]')
    # target adjacent; a second light dummy 2 away from the baneling (inside 2.2); an armored one 3 away
    place(sim, (10, 16), (30, 30), (10.8, 16), (10, 18), (10, 19))
    out = sim.step(torch.tensor([[6, STOP]]))
    assert not out.alive[0, 0]
    assert sim.hp[0, 2].item() == pytest.approx(10000 - 35)  # 16 + 19 vs light
    assert sim.hp[0, 3].item() == pytest.approx(10000 - 35)
    assert sim.hp[0, 4].item() == 10000


def test_colossus_splash_hits_units_around_the_target(tmp_path):
    sim = duel(tmp_path, '[{unit="colossus", count=1}]',
               '[{unit="light_dummy", count=1}, {unit="light_dummy", count=1}, {unit="light_dummy", count=1}]')
    place(sim, (10, 16), (15, 16), (15, 16.9), (15, 18))
    sim.step(attack(sim, 0))
    hit = 2 * (10 + 5)
    assert sim.hp[0, 1].item() == pytest.approx(10000 - hit)
    assert sim.hp[0, 2].item() == pytest.approx(10000 - hit)  # 0.9 from the target: inside the radius 1
    assert sim.hp[0, 3].item() == 10000


def test_moves_and_map_bounds(tmp_path):
    sim = duel(tmp_path, '[{unit="marine", count=1}]', '[{unit="dummy", count=1}]')
    place(sim, (10, 31), (30, 1))
    assert sim.avail[0, 0, 2:6].tolist() == [False, True, True, True]  # north would leave the map
    assert sim.obs[0, 0, :4].tolist() == [0.0, 1.0, 1.0, 1.0]
    sim.step(torch.tensor([[EAST]]))
    step = 3.15 * LOOPS_PER_STEP / LOOPS_PER_SECOND
    assert sim.pos[0, 0].tolist() == pytest.approx([10 + step, 31])


def test_zerg_regenerate(tmp_path):
    sim = duel(tmp_path, '[{unit="zergling", count=1}]', '[{unit="dummy", count=1}]')
    place(sim, (10, 16), (30, 30))
    sim.hp[0, 0] = 10.0
    sim.step(torch.tensor([[STOP]]))
    assert sim.hp[0, 0].item() == pytest.approx(10 + 0.38 * LOOPS_PER_STEP / LOOPS_PER_SECOND)


def test_episode_limit_ends_as_timeout(tmp_path):
    sim = duel(tmp_path, '[{unit="marine", count=1}]', '[{unit="dummy", count=1}]', limit=7)
    place(sim, (2, 2), (30, 30))
    for t in range(7):
        out = sim.step(torch.tensor([[STOP]]))
        assert bool(out.done[0]) == (t == 6)
    assert out.timeout[0] and not out.won[0]
    assert out.episode_length[0] == 7
    assert out.reward[0] == 0
    # auto-reset: the new episode starts from the formation with full health
    assert sim.t[0] == 0 and sim.alive[0].all()


def test_killing_every_enemy_scores_exactly_20():
    sc = load_scenario("3m")
    sim = BattleSim(sc, 1, seed=3)
    # put the enemies right in front of the agents and focus them down one at a time
    for j in range(3):
        sim.pos[0, 3 + j] = sim.pos[0, j] + torch.tensor([4.0, 0.0])
    sim.hp[0, :3] = 10000.0  # agents never die, so the fight always ends in a win
    sim.max_hp[:3] = 10000.0
    out = sim.refresh()
    total = 0.0
    for _ in range(sc.episode_limit):
        alive_enemy = sim.alive[0, 3:].nonzero().flatten()
        target = int(alive_enemy[0])
        act = torch.where(out.avail[0, :, 6 + target], 6 + target, STOP)[None]
        out = sim.step(act)
        total += float(out.reward[0])
        if out.done[0]:
            break
    assert out.won[0]
    assert total == pytest.approx(20.0, abs=1e-4)
    assert out.episode_return[0].item() == pytest.approx(20.0, abs=1e-4)
