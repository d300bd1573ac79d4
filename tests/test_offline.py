"""Offline training from logged experience (trainer/offline.py): V-trace, the learner, and the whole loop from a
served game to a new model version."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.cli import build_parser, main
from trainer.commands import offline_config_from_args, train_config_from_args
from trainer.config import OfflineConfig, TrainError
from trainer.offline import backward_plan, train_offline, vtrace
from trainer.policy import Policy
from trainer.repository import ModelRepository
from trainer.shards import METADATA_KEY, Chunk, ShardError, chunk_table, read_shards, write_shard
from trainer.sim import load_scenario

ROOT = Path(__file__).resolve().parent.parent

def vtrace_reference(log_ratio, rewards, values, has_next, sample, gamma, lam, rho_bar, c_bar):
    """IMPALA's recursion, one row at a time from the back."""
    R = len(rewards)
    vs, adv = [0.0] * R, [0.0] * R
    for s in reversed(range(R)):
        ratio = math.exp(log_ratio[s])
        rho, c = min(rho_bar, ratio), lam * min(c_bar, ratio)
        if not sample[s]:
            vs[s] = values[s]
            continue
        nxt_v = values[s + 1] if has_next[s] else 0.0
        nxt_vs = vs[s + 1] if has_next[s] else 0.0
        g = gamma if has_next[s] else 0.0
        vs[s] = values[s] + rho * (rewards[s] + g * nxt_v - values[s]) + g * c * (nxt_vs - nxt_v)
        adv[s] = rho * (rewards[s] + g * nxt_vs - values[s])
    return vs, adv


def test_vtrace_on_policy_with_lambda_one_gives_discounted_returns():
    rewards = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([0.5, -1.0, 4.0])
    has_next = torch.tensor([True, True, False])
    sample = torch.ones(3, dtype=torch.bool)
    vs, adv = vtrace(torch.zeros(3), rewards, values, has_next, sample, backward_plan(has_next), gamma=0.9, lam=1.0)
    assert vs.tolist() == pytest.approx([1 + 0.9 * (2 + 0.9 * 3), 2 + 0.9 * 3, 3])
    assert adv.tolist() == pytest.approx([float(vs[0] - values[0]), float(vs[1] - values[1]), 3 - 4.0])


def test_vtrace_matches_the_reference_on_many_trajectories_with_cuts_and_clipped_ratios():
    gen = torch.Generator().manual_seed(0)
    lengths, done_at_end = [5, 1, 3, 7, 2, 4], [True, False, True, False, True, True]
    has_next, sample = [], []
    for L, done in zip(lengths, done_at_end):
        has_next += [True] * (L - 1) + [False]
        sample += [True] * (L - 1) + [done]
    R = len(has_next)
    has_next, sample = torch.tensor(has_next), torch.tensor(sample)
    rewards, values = torch.randn(R, generator=gen), torch.randn(R, generator=gen)
    log_ratio = 1.5 * torch.randn(R, generator=gen)  # plenty of ratios above and below the clips
    for lam, rho_bar, c_bar in ((0.95, 1.0, 1.0), (0.0, 1.0, 1.0), (1.0, 2.0, 0.5)):
        vs, adv = vtrace(log_ratio, rewards, values, has_next, sample, backward_plan(has_next), gamma=0.97, lam=lam,
                         rho_bar=rho_bar, c_bar=c_bar)
        want_vs, want_adv = vtrace_reference(log_ratio.tolist(), rewards.tolist(), values.tolist(), has_next.tolist(),
                                             sample.tolist(), 0.97, lam, rho_bar, c_bar)
        assert vs.tolist() == pytest.approx(want_vs, abs=1e-5)
        assert adv.tolist() == pytest.approx(want_adv, abs=1e-5)


def synthetic_shards(directory, scenario, rows: int = 512, seed: int = 0):
    """One-step episodes logged by a behaviour that picks action 1 or 2 with probability 1/2 each: action 1 earns 1,
    action 2 earns 0."""
    rng = np.random.default_rng(seed)
    O, N = scenario.obs_size, scenario.n_actions
    action = rng.integers(1, 3, rows)
    mask = np.zeros((rows, N), bool)
    mask[:, 1:3] = True
    chunk = Chunk(game_ids=["g"], game_index=np.zeros(rows, np.int32), episode_id=np.zeros(rows, np.uint64),
                  unit_id=rng.integers(0, scenario.n_agents, rows).astype(np.int32),
                  trajectory=np.arange(rows, dtype=np.uint64), step=np.zeros(rows, np.uint32),
                  obs=rng.standard_normal((rows, O)).astype(np.float32), mask=mask, action=action.astype(np.int32),
                  log_prob=np.full(rows, math.log(0.5), np.float32), value=np.zeros(rows, np.float32),
                  greedy=np.zeros(rows, bool), reward=(action == 1).astype(np.float32), done=np.ones(rows, bool),
                  truncated=np.zeros(rows, bool), model_version=np.ones(rows, np.uint64))
    table = chunk_table(chunk, spec_name=scenario.name, spec_hash=scenario.spec_hash, run_id="synthetic")
    return write_shard(directory, "synthetic", table), chunk


def test_offline_learner_prefers_the_action_the_log_rewarded(tmp_path):
    sc = load_scenario("3m")
    _, chunk = synthetic_shards(tmp_path / "shards", sc)
    cfg = OfflineConfig(shards=(str(tmp_path / "shards"),), models=str(tmp_path / "models"), name="off", scenario="3m",
                        hidden=16, iterations=4, epochs=4, minibatches=2, lr=3e-3, ent_coef=0.0, eval_episodes=4,
                        progress=False)
    result = train_offline(cfg)
    obs, mask = torch.from_numpy(chunk.obs), torch.from_numpy(chunk.mask)
    with torch.no_grad():
        logits, _ = result.policy.actor_step(obs, mask, torch.from_numpy(chunk.unit_id).long())
    p = torch.softmax(logits, 1)
    assert float((p[:, 1] / (p[:, 1] + p[:, 2])).mean()) > 0.8  # it started near 0.5
    assert result.summary["version"] == 1 and result.summary["samples"] == 512
    # a fresh critic learns alone first (critic_warmup iterations), then the actor with it
    assert [r["actor_learns"] for r in result.history] == [False] * cfg.critic_warmup + [True] * 4
    assert (tmp_path / "models" / "off" / "logs" / "off-3m-offline.csv").is_file()
    card = ModelRepository(tmp_path / "models").load("off").card
    assert card["critic"] == "local" and card["offline"]["behaviour_versions"] == [1]
    assert card["spec"]["hash"] == sc.spec_hash and card["eval_win_rate"] is not None
    # the card says how the version was learned, and nothing about where the files were
    assert (card["training"]["iterations"], card["training"]["lr"], card["training"]["ent_coef"]) == (4, 3e-3, 0.0)
    assert not {"shards", "models", "name", "log_dir"} & set(card["training"])
    # a second offline run (its critic already trained: no warm-up) adds its rows to the log, not replacing them
    again = train_offline(dataclasses.replace(cfg, iterations=2, resume="latest"))
    with open(tmp_path / "models" / "off" / "logs" / "off-3m-offline.csv", newline="") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == list(range(1, cfg.critic_warmup + 5)) + [1, 2]
    # it was judged against the version it started from, on the same games
    start = again.summary["start_eval_win_rate"]
    assert start == ModelRepository(tmp_path / "models").load("off", 1).card["eval_win_rate"]


def test_a_log_whose_clients_never_sent_a_reward_is_warned_about(tmp_path, capsys):
    """Absent prev_reward / prev_done count as 0 / false, so a client that never sends them logs samples that
    pass every check; all-zero rewards with no episode end is said out loud."""
    sc = load_scenario("3m")
    rows = 64
    two_steps = np.arange(rows) % 2  # trajectories of two steps, the second still waiting at shutdown
    chunk = Chunk(game_ids=["g"], game_index=np.zeros(rows, np.int32), episode_id=np.zeros(rows, np.uint64),
                  unit_id=np.zeros(rows, np.int32), trajectory=(np.arange(rows) // 2).astype(np.uint64),
                  step=two_steps.astype(np.uint32), obs=np.zeros((rows, sc.obs_size), np.float32),
                  mask=np.ones((rows, sc.n_actions), bool), action=np.ones(rows, np.int32),
                  log_prob=np.full(rows, -1.0, np.float32), value=np.zeros(rows, np.float32),
                  greedy=np.zeros(rows, bool), reward=np.zeros(rows, np.float32), done=np.zeros(rows, bool),
                  truncated=two_steps.astype(bool), model_version=np.ones(rows, np.uint64))
    write_shard(tmp_path / "shards", "silent", chunk_table(chunk, spec_name=sc.name, spec_hash=sc.spec_hash,
                                                            run_id="silent"))
    cfg = OfflineConfig(shards=(str(tmp_path / "shards"),), models=str(tmp_path / "models"), name="off",
                        scenario="3m", hidden=8, iterations=1, critic_warmup=0, epochs=1, eval_episodes=2,
                        progress=False)
    train_offline(cfg)
    assert "all 32 samples have reward 0 and no episode ended" in capsys.readouterr().err
    synthetic_shards(tmp_path / "rewarded", sc)  # a log with rewards: no warning
    train_offline(dataclasses.replace(cfg, shards=(str(tmp_path / "rewarded"),), name="rewarded"))
    assert "reward 0" not in capsys.readouterr().err


class _SignalAtIteration:
    """Training metrics that send this process a signal when iteration `at` (1-based, warm-up included) is logged:
    a Ctrl-C or `docker stop` in the middle of a run, at a known point."""

    def __init__(self, at: int, signum: int = signal.SIGTERM):
        self.at, self.signum, self.seen = at, signum, 0

    def update_iteration(self, **_):
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), self.signum)

    def update_eval(self, **_):
        pass


def test_a_signal_ends_an_offline_run_after_its_iteration_with_a_saved_version(tmp_path):
    """SIGTERM after the actor's second update: the run stops there, evaluates and saves what it learned, and says
    why it stopped (it used to die at once, with nothing saved)."""
    sc = load_scenario("3m")
    synthetic_shards(tmp_path / "shards", sc)
    cfg = OfflineConfig(shards=(str(tmp_path / "shards"),), models=str(tmp_path / "models"), name="off", scenario="3m",
                        hidden=16, iterations=6, critic_warmup=2, epochs=2, eval_episodes=4, progress=False)
    before = signal.getsignal(signal.SIGTERM)
    result = train_offline(cfg, metrics=_SignalAtIteration(at=4))
    assert result.summary["stop_reason"] == "SIGTERM" and result.summary["iterations"] == 2
    assert [r["actor_learns"] for r in result.history] == [False, False, True, True]
    card = ModelRepository(tmp_path / "models").load("off").card
    assert result.summary["version"] == 1 and card["offline"]["iterations"] == 2
    assert signal.getsignal(signal.SIGTERM) == before
    # the name is free again: a second run (resumed: its critic needs no warm-up) goes to the end
    again = train_offline(dataclasses.replace(cfg, iterations=1, resume="latest"))
    assert (again.summary["stop_reason"], again.summary["version"]) == ("iterations", 2)


def _signal_at_loss_call(monkeypatch, at: int, signum: int):
    """Send this process `signum` during the `at`-th PPO minibatch update (1-based) of an offline run."""
    import trainer.offline

    real_loss, calls = trainer.offline.ppo_loss, []

    def loss_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer.offline, "ppo_loss", loss_then_signal)
    return calls


def test_a_signal_during_the_critic_warm_up_stops_at_once_saves_nothing_and_exits_with_it(tmp_path, capsys,
                                                                                          monkeypatch):
    """Before the actor's first update there is nothing worth a version: the run stops at its next minibatch (the
    rest of the warm-up would be thrown away), saves nothing, and the command exits 128 + the signal, saying so."""
    synthetic_shards(tmp_path / "shards", load_scenario("3m"), rows=64)
    calls = _signal_at_loss_call(monkeypatch, at=1, signum=signal.SIGINT)
    code = main(["train", "--from-shards", str(tmp_path / "shards"), "--models", str(tmp_path / "models"), "--name",
                 "off", "--scenario", "3m", "--hidden", "16", "--critic-warmup", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT, err
    assert "SIGINT: stopping after this iteration with a last evaluation and version (none before the actor's" in err
    assert "SIGINT before the actor's first update (0 of 3 critic warm-up iterations done): no version was saved" in err
    assert len(calls) == 1  # not the 3 x 10 x 2 updates of the warm-up
    assert ModelRepository(tmp_path / "models").latest("off") is None


def test_a_signal_once_the_actor_learns_saves_a_version_prints_the_summary_and_exits_with_it(tmp_path, capsys,
                                                                                             monkeypatch):
    synthetic_shards(tmp_path / "shards", load_scenario("3m"), rows=64)
    _signal_at_loss_call(monkeypatch, at=1, signum=signal.SIGTERM)  # the first actor update (no warm-up)
    code = main(["train", "--from-shards", str(tmp_path / "shards"), "--models", str(tmp_path / "models"), "--name",
                 "off", "--scenario", "3m", "--hidden", "16", "--critic-warmup", "0", "--iterations", "5",
                 "--eval-episodes", "4", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 128 + signal.SIGTERM, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["stop_reason"], summary["iterations"], summary["version"]) == ("SIGTERM", 1, 1)
    assert ModelRepository(tmp_path / "models").load("off").card["offline"]["iterations"] == 1


def test_offline_command_refuses_what_does_not_apply(tmp_path, capsys):
    sc = load_scenario("3m")
    synthetic_shards(tmp_path / "shards", sc, rows=8)
    base = ["train", "--from-shards", str(tmp_path / "shards"), "--models", str(tmp_path / "m"), "--name", "x"]
    assert main(base + ["--critic", "central"]) == 2
    assert "--critic central applies to simulation training only" in capsys.readouterr().err
    assert main(base + ["--ent-coef-final", "0"]) == 2
    assert "--ent-coef-final applies to simulation training only" in capsys.readouterr().err
    assert main(base + ["--target-window", "3"]) == 2
    assert "--target-window applies to simulation training only" in capsys.readouterr().err
    assert main(base + ["--rollout", "64"]) == 2
    assert "--rollout applies to simulation training only" in capsys.readouterr().err
    # the entropy flags' defaults differ by mode: online anneals 0.1 -> 0.02, offline keeps a constant 0.05
    assert offline_config_from_args(build_parser().parse_args(base)).ent_coef == 0.05
    online = train_config_from_args(build_parser().parse_args(["train", "--models", "m", "--name", "x"]))
    assert (online.ent_coef, online.ent_coef_final) == (0.1, 0.02)
    assert offline_config_from_args(build_parser().parse_args(base + ["--ent-coef", "0.2"])).ent_coef == 0.2
    assert main(base + ["--scenario", "8m"]) == 2
    err = capsys.readouterr().err
    assert "synthetic.parquet: logged under spec '3m'" in err and f"expected spec hash {load_scenario('8m').spec_hash}" in err
    with pytest.raises(TrainError, match="--iterations must be >= 1, got 0"):
        OfflineConfig(shards=("d",), models="m", name="x", iterations=0)


def test_served_games_are_logged_then_learned_from_into_a_new_version(tmp_path):
    """The whole loop: `phalanx serve --experience-dir` (a MAPPO model), games played through the client library
    with rewards on the next request, SIGTERM, then `phalanx train --from-shards --resume latest`."""
    from service.client import AsyncClient
    from service.play import play_games

    sc = load_scenario("3m")
    torch.manual_seed(0)
    root = tmp_path / "models"
    policy = Policy.for_scenario(sc, critic="central", hidden=32)
    ModelRepository(root).save("m", policy, scenario=sc, step=100, eval_win_rate=None)
    experience = tmp_path / "experience"
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--models", str(root), "--name", "m", "--port",
                             "0", "--poll-seconds", "0", "--experience-dir", str(experience),
                             "--experience-chunk-rows", "200"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"serve did not start: {proc.stderr.read()}")
    ready = json.loads(line)
    try:
        async def play():
            async with AsyncClient(ready["address"]) as client:
                return await play_games(client, sc, games=6, seed=5, rpc="stream", greedy=False)

        played = asyncio.run(play())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    code = proc.returncode
    assert code == 0, err
    stopped = json.loads(out.strip().splitlines()[-1])
    closing = 6 * sc.n_agents  # each unit's request of the next episode, carrying its last reward and done
    assert stopped["experience_rows"] == played.units + closing and stopped["experience_shards"] >= 2

    data = read_shards(experience, spec_hash=sc.spec_hash)
    assert data.rows == played.units + closing
    assert int(data.done.sum()) == closing  # every unit's trajectory ended with a done step
    assert data.samples == played.units
    # every unit alive at a step of a game carries that step's team reward, and they add up to the game's return
    import pyarrow.parquet as pq
    team: dict = {}
    for r in pq.read_table(sorted(experience.glob("*.parquet"))).to_pylist():
        if r["episode_id"] == 0:  # all units start together, so a trajectory's step is the game's step
            team.setdefault((r["game_id"], r["step"]), set()).add(round(r["reward"], 5))
    assert all(len(rewards) == 1 for rewards in team.values())
    returns = {}
    for (game, _), rewards in team.items():
        returns[game] = returns.get(game, 0.0) + rewards.pop()
    assert sorted(returns.values()) == pytest.approx(sorted(played.returns), abs=1e-3)

    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["train", "--from-shards", str(experience), "--models", str(root), "--name", "m", "--resume", "latest",
                   "--iterations", "2", "--epochs", "2", "--eval-episodes", "8", "--no-progress"])
    assert rc == 0
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert summary["mode"] == "offline" and summary["scenario"] == "3m" and summary["version"] == 2
    assert summary["resumed_from"] == 1 and summary["samples"] == played.units
    loaded = ModelRepository(root).load("m", 2)
    assert loaded.card["critic"] == "local" and loaded.card["step"] == 100 + played.units
    assert loaded.card["offline"]["behaviour_versions"] == [1]
    assert not torch.equal(loaded.policy.actor_head.weight, policy.actor_head.weight)  # it learned
    # the first iteration starts from the served actor: the logged log-probs are its own, so every ratio is 1
    import csv
    with open(summary["csv"]) as f:
        first = next(csv.DictReader(f))
    assert float(first["mean_ratio_to_behaviour"]) == pytest.approx(1.0, abs=1e-4)


def test_a_flipped_bit_inside_a_shard_page_is_refused(tmp_path):
    """Truncation loses the footer and is refused anyway; damage inside a page used to pass when the values it
    produced still looked legal (a unit id changed from 1 to 2), so pages carry checksums."""
    import pyarrow.parquet as pq

    path, _ = synthetic_shards(tmp_path / "shards", load_scenario("3m"), rows=4000)
    meta = pq.ParquetFile(path).metadata
    data = path.read_bytes()
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    for column in ("unit_id", "obs.list.element", "action"):
        chunk = meta.row_group(0).column(names.index(column))
        for at in (0.5, 0.9):  # inside the compressed page data, past the page header
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            offset = start + int(chunk.total_compressed_size * at)
            bad = tmp_path / f"bad-{column}-{at}.parquet"
            bad.write_bytes(data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1:])
            with pytest.raises(ShardError, match=rf"{bad.name}: not a readable Parquet shard"):
                read_shards(bad)


def test_shard_metadata_of_the_wrong_type_is_refused(tmp_path):
    import pyarrow.parquet as pq

    path, _ = synthetic_shards(tmp_path / "shards", load_scenario("3m"))
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    odd = tmp_path / "odd.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps({**meta, "run_id": ["a"]}).encode()}), odd)
    with pytest.raises(ShardError, match=r"odd\.parquet: metadata run_id must be a string"):
        read_shards(odd)


def test_a_simulation_run_resumed_from_an_offline_version_learns_with_the_simulation_runs_settings(tmp_path):
    """An offline version records offline settings (a constant bonus 0.05, its own epochs); resuming it in the
    simulator takes the settings of the simulation run it came from, not those."""
    models = str(tmp_path / "models")
    assert main(["train", "--scenario", "3m", "--models", models, "--name", "m", "--steps", "256", "--envs", "32",
                 "--hidden", "16", "--epochs", "3", "--lr", "1e-4", "--eval-episodes", "4", "--no-progress"]) == 0
    synthetic_shards(tmp_path / "shards", load_scenario("3m"))
    assert main(["train", "--from-shards", str(tmp_path / "shards"), "--models", models, "--name", "m",
                 "--resume", "latest", "--iterations", "1", "--eval-episodes", "4", "--no-progress"]) == 0
    assert ModelRepository(models).load_card("m")[0]["training"]["ent_coef"] == OfflineConfig.ent_coef
    cfg = train_config_from_args(build_parser().parse_args(["train", "--models", models, "--name", "m",
                                                            "--resume", "latest"]))
    assert (cfg.lr, cfg.epochs, cfg.ent_coef, cfg.ent_coef_final) == (1e-4, 3, 0.1, 0.02)
    # but the network now has a local critic (it got one offline): the local critic's rollouts, not the old ones
    assert (cfg.critic, cfg.envs, cfg.rollout, cfg.gae_lambda) == ("local", 64, 128, 1.0)
    # and its simulation curve continues from the simulation run's last row, past the offline version
    before = list(csv.DictReader(open(tmp_path / "models" / "m" / "logs" / "m-3m.csv")))
    assert main(["train", "--models", models, "--name", "m", "--resume", "latest", "--steps", "64", "--envs", "8",
                 "--rollout", "8", "--eval-episodes", "4", "--no-progress"]) == 0
    after = list(csv.DictReader(open(tmp_path / "models" / "m" / "logs" / "m-3m.csv")))
    assert after[:len(before)] == before and len(after) == len(before) + 1
    assert int(after[-1]["samples"]) > int(before[-1]["samples"])
