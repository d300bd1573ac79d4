"""The simulator's contract: sizes, determinism, batching, scenario files, PettingZoo, the CLI."""

import json
import subprocess
import sys

import pytest
import torch

from trainer.sim import BattleSim, ScenarioError, load_catalogue, load_scenario
from trainer.sim.baselines import BASELINES

SMAC_SIZES = {"3m": (30, 48, 9), "MMM2": (176, 322, 18), "27m_vs_30m": (285, 1170, 36), "8m": (80, 168, 14),
              "2s3z": (80, 120, 11), "3s5z": (128, 216, 14), "5m_vs_6m": (55, 98, 12), "MMM": (160, 290, 16)}
REQUIRED = ["3m", "8m", "25m", "5m_vs_6m", "8m_vs_9m", "10m_vs_11m", "27m_vs_30m", "2s3z", "3s5z", "3s5z_vs_3s6z",
            "MMM", "MMM2"]
LIMITS = {"3m": 60, "8m": 120, "25m": 150, "5m_vs_6m": 70, "8m_vs_9m": 120, "10m_vs_11m": 150, "27m_vs_30m": 180,
          "2s3z": 120, "3s5z": 150, "3s5z_vs_3s6z": 170, "MMM": 150, "MMM2": 180}


@pytest.mark.parametrize("name", sorted(SMAC_SIZES))
def test_sizes_match_smac(name):
    sc = load_scenario(name)
    assert (sc.obs_size, sc.state_size, sc.n_actions) == SMAC_SIZES[name]
    out = BattleSim(sc, 2, seed=0).reset()
    assert out.obs.shape == (2, sc.n_agents, sc.obs_size)
    assert out.state.shape == (2, sc.state_size)
    assert out.avail.shape == (2, sc.n_agents, sc.n_actions)


def test_every_required_scenario_with_smac_limits():
    catalogue = load_catalogue()
    for name in REQUIRED:
        assert catalogue[name].episode_limit == LIMITS[name]


def run(sim: BattleSim, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    trace = []
    for _ in range(steps):
        out = sim.step(BASELINES["random"](sim, g))
        trace.append((out.obs.clone(), out.state.clone(), out.reward.clone(), out.done.clone()))
    return trace


def test_deterministic_for_a_seed():
    sc = load_scenario("2s3z")
    a = run(BattleSim(sc, 8, seed=5), 150, seed=1)
    b = run(BattleSim(sc, 8, seed=5), 150, seed=1)
    for x, y in zip(a, b):
        for p, q in zip(x, y):
            assert torch.equal(p, q)
    c = BattleSim(sc, 8, seed=6).reset()
    assert not torch.equal(a[0][0], c.obs)


@pytest.mark.parametrize("name", ["3m", "MMM2", "bane_vs_bane"])
def test_batch_equals_one_by_one(name):
    sc = load_scenario(name)
    E, steps = 4, sc.episode_limit + 10  # long enough to cross an auto-reset
    batch = BattleSim(sc, E, seed=100)
    singles = [BattleSim(sc, 1, seed=100 + i) for i in range(E)]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        actions = BASELINES["random"](batch, g)
        out = batch.step(actions)
        for i, s in enumerate(singles):
            o = s.step(actions[i:i + 1])
            assert torch.equal(o.obs[0], out.obs[i])
            assert torch.equal(o.state[0], out.state[i])
            assert torch.equal(o.avail[0], out.avail[i])
            assert torch.equal(o.reward[0], out.reward[i])
            assert torch.equal(o.done[0], out.done[i])


def test_observations_are_normalised_and_stats_are_consistent():
    sc = load_scenario("MMM2")
    sim = BattleSim(sc, 16, seed=0)
    g = torch.Generator().manual_seed(0)
    episodes = 0
    for _ in range(sc.episode_limit + 1):
        out = sim.step(BASELINES["focus-fire"](sim, g))
        assert out.obs.abs().max() <= 1.5 and out.state.abs().max() <= 1.5
        assert torch.all(out.obs[~out.alive] == 0)
        d = out.done
        episodes += int(d.sum())
        assert torch.all(out.episode_length[d] <= sc.episode_limit)
        won = d & out.won
        assert torch.all(out.allies_left[won] > 0)
        assert torch.all(out.enemies_left[won] <= 1)  # at most MMM2's enemy medivac, which cannot fight
        assert torch.all(out.won[d] <= ~out.timeout[d])
        assert torch.all(out.episode_return[d] <= 20.0 + 1e-3)
    assert episodes >= 16


def test_baselines_only_choose_legal_actions():
    for name in ["MMM2", "2s3z", "bane_vs_bane"]:
        sim = BattleSim(load_scenario(name), 8, seed=1)  # check_actions raises on any illegal action
        g = torch.Generator().manual_seed(0)
        for policy in BASELINES.values():
            for _ in range(40):
                sim.step(policy(sim, g))


def test_scripted_baselines_beat_random_on_3m():
    sc = load_scenario("3m")
    wins = {}
    for name, policy in BASELINES.items():
        sim = BattleSim(sc, 200, seed=0)
        g = torch.Generator().manual_seed(0)
        done = torch.zeros(200, dtype=torch.bool)
        won = torch.zeros(200, dtype=torch.bool)
        for _ in range(sc.episode_limit):
            out = sim.step(policy(sim, g))
            won |= out.won & ~done
            done |= out.done
        wins[name] = won.float().mean().item()
    assert wins["random"] < wins["attack-nearest"] and wins["random"] < wins["focus-fire"]


def test_wrong_action_shape_is_refused():
    sim = BattleSim(load_scenario("3m"), 2, seed=0)
    with pytest.raises(ValueError, match=r"\(n_envs, n_agents\) = \(2, 3\)"):
        sim.step(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..8"):
        sim.step(torch.full((2, 3), 9))


# --- scenario files ---------------------------------------------------------------------------------

GOOD = """
[units.grunt]
race = "other"
health = 60
damage = 7
cooldown = 1.0
range = 4
speed = 3
attributes = ["light"]

[scenarios.grunts]
map = [24, 24]
episode_limit = 50
agents = [{unit = "grunt", count = 2}, {unit = "marine", count = 1}]
enemies = [{unit = "grunt", count = 3}]
agent_spawn = [8, 12]
enemy_spawn = [16, 12]
"""


def test_user_scenario_file_adds_units_and_scenarios(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(GOOD)
    sc = load_scenario("grunts", [f])
    assert sc.unit_types == ("grunt", "marine")
    assert sc.obs_size == 4 + 3 * (5 + 2) + 2 * (5 + 2) + (1 + 2)
    sim = BattleSim(sc, 4, seed=0)
    for _ in range(60):
        sim.step(BASELINES["attack-nearest"](sim))


@pytest.mark.parametrize("patch, message", [
    (("health = 60", "health = -1"), "units.grunt.health: must be > 0, got -1"),
    (("health = 60", 'health = "lots"'), "units.grunt.health: must be a finite number"),
    (("episode_limit = 50", "episode_limit = 0"), "scenarios.grunts.episode_limit: must be >= 1"),
    (('unit = "grunt", count = 3', 'unit = "ghost", count = 3'), "enemies[0].unit: unknown unit type 'ghost'"),
    (("speed = 3", "sped = 3"), "units.grunt: unknown field(s) sped"),
    (("map = [24, 24]", "map = [24]"), "scenarios.grunts.map: must be a list of two numbers"),
    (("enemy_spawn = [16, 12]", "enemy_spawn = [40, 12]"), "enemy_spawn: [40.0, 12.0] lies outside the map"),
    (("range = 4", ""), "units.grunt.range: required field is missing"),
    (("[scenarios.grunts]", "[scenarios.grunts"), "not valid TOML"),
])
def test_bad_scenario_file_names_the_field(tmp_path, patch, message):
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace(*patch))
    with pytest.raises(ScenarioError) as e:
        load_scenario("grunts", [f])
    assert message in str(e.value)
    assert str(f) in str(e.value)


def test_spec_hash_follows_the_layout(tmp_path):
    assert load_scenario("3m").spec_hash == load_scenario("3m").spec_hash
    assert load_scenario("3m").spec_hash != load_scenario("8m").spec_hash
    f = tmp_path / "tweak.toml"
    f.write_text('[units.marine]\nrace="terran"\nhealth=55\ndamage=6\nrange=5\nspeed=3.15\n')
    assert load_scenario("3m", [f]).spec_hash != load_scenario("3m").spec_hash
    # a medivac that no longer heals, same name and health: its target actions now mean "attack enemy k"
    g = tmp_path / "no-heal.toml"
    g.write_text('[units.medivac]\nrace="terran"\nhealth=150\narmor=1\ndamage=6\nrange=4\nspeed=3.5\n'
                 'attributes=["armored", "mechanical"]\nflying=true\n')
    assert load_scenario("MMM", [g]).spec_hash != load_scenario("MMM").spec_hash


# --- PettingZoo and the command line ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["3m", "2s3z", "MMM2"])
def test_pettingzoo_parallel_api(name):
    from pettingzoo.test import parallel_api_test

    from trainer.sim.pettingzoo_env import parallel_env

    parallel_api_test(parallel_env(name), num_cycles=200)


def test_pettingzoo_episode_plays_to_the_end():
    from trainer.sim.pettingzoo_env import parallel_env

    env = parallel_env("3m")
    obs, infos = env.reset(seed=3)
    assert set(obs) == {"agent_0", "agent_1", "agent_2"}
    total = 0.0
    for _ in range(60):
        acts = {a: int(torch.tensor(obs[a]["action_mask"]).nonzero()[-1]) for a in env.agents}
        obs, rew, term, trunc, infos = env.step(acts)
        total += next(iter(rew.values()))
        if not env.agents:
            break
    assert not env.agents
    last = next(iter(infos.values()))
    assert last["episode_return"] == pytest.approx(total, abs=1e-4)


def test_pettingzoo_step_names_an_active_agent_left_without_an_action():
    from trainer.sim.pettingzoo_env import parallel_env

    env = parallel_env("3m")
    obs, _ = env.reset(seed=3)
    acts = {a: int(torch.tensor(obs[a]["action_mask"]).nonzero()[-1]) for a in ("agent_0", "agent_2")}
    with pytest.raises(KeyError, match=r"no action for active agent\(s\) \['agent_1'\]"):
        env.step(acts)
    acts["agent_1"] = 1  # stop: the same step goes through once every agent has an action
    env.step(acts)


def phalanx(*args):
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, timeout=120)


def test_cli_scenarios_json():
    r = phalanx("scenarios", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert set(REQUIRED) <= set(rows)
    assert {k: rows["MMM2"][k] for k in ("n_agents", "n_enemies", "obs_size", "state_size", "n_actions",
                                         "episode_limit")} == {
        "n_agents": 10, "n_enemies": 12, "obs_size": 176, "state_size": 322, "n_actions": 18, "episode_limit": 180}


def test_cli_scenarios_reports_a_bad_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace("health = 60", "health = 0"))
    r = phalanx("scenarios", "--scenario-file", str(f))
    assert r.returncode == 2
    assert "units.grunt.health: must be > 0" in r.stderr


def test_cli_replay_writes_a_gif(tmp_path):
    out = tmp_path / "3m.gif"
    r = phalanx("replay", "--scenario", "3m", "--policy", "focus-fire", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    from PIL import Image

    with Image.open(out) as im:
        assert im.n_frames == result["frames"] == result["episode_length"] + 1
    r = phalanx("replay", "--scenario", "3m", "--policy", "sneaky", "--out", str(out))
    assert r.returncode == 2 and "unknown policy 'sneaky'" in r.stderr


def test_replay_plays_a_recurrent_model_as_eval_does(tmp_path):
    """A recurrent actor carries its hidden state through the replayed episode, and --seed S replays the game
    that eval plays with --seed S."""
    import torch

    from trainer.policy import Policy
    from trainer.ppo import evaluate
    from trainer.repository import ModelRepository
    from trainer.sim.replay import record_episode

    sc = load_scenario("3m")
    torch.manual_seed(3)
    policy = Policy.for_scenario(sc, hidden=16, recurrent=True, agent_id=True)
    ModelRepository(tmp_path).save("r", policy, scenario=sc, step=0, eval_win_rate=None)
    frames, result = record_episode("3m", "model", seed=5, models=str(tmp_path), name="r")
    assert len(frames) == result["episode_length"] + 1
    ev = evaluate(ModelRepository(tmp_path).load("r").policy, sc, 1, 5)
    assert result["episode_return"] == pytest.approx(ev["mean_return"], abs=1e-3)


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`phalanx scenarios --json | head -1`: the pipe closes before everything is written; no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "service.cli", "scenarios", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command writes a line
    _, err = p.communicate(timeout=60)
    assert p.returncode == 141 and b"Traceback" not in err, err.decode()
