"""The PPO learner: GAE, the clipped loss, learning beats random play, every sharing mode and critic runs."""

import csv
from pathlib import Path

import pytest
import torch

from trainer.policy import Policy
from trainer.ppo import (TrainConfig, TrainError, adam_state, evaluate, gae, ppo_loss, restore_adam_state,
                         select_actor_rows, team_gae, train)
from trainer.repository import ModelRepository
from trainer.sim import load_scenario


def tiny_cfg(tmp_path, **kw):
    base = dict(models=str(tmp_path / "models"), name="m", scenario="3m", envs=32, rollout=8, hidden=16,
                epochs=2, minibatches=2, steps=32 * 8 * 3, eval_every=32 * 8 * 3, eval_episodes=16, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_gae_matches_the_definition():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0], [0.0], [2.0], [1.0]])
    values = torch.tensor([[0.5], [0.2], [0.1], [0.3]])
    dones = torch.tensor([[False], [True], [False], [False]])
    next_value = torch.tensor([0.7])
    adv = gae(rewards, values, next_value, dones, gamma, lam)
    # by hand: deltas, then the lambda-discounted sums that stop at a terminal step
    d3 = 1.0 + gamma * 0.7 - 0.3
    d2 = 2.0 + gamma * 0.3 - 0.1
    d1 = 0.0 - 0.2  # terminal: no bootstrap
    d0 = 1.0 + gamma * 0.2 - 0.5
    expected = [d0 + gamma * lam * d1, d1, d2 + gamma * lam * d3, d3]
    assert torch.allclose(adv[:, 0], torch.tensor(expected), atol=1e-6)


def test_clipped_objective_stops_the_gradient_outside_the_trust_region():
    sc = load_scenario("3m")
    torch.manual_seed(0)
    policy = Policy.for_scenario(sc, hidden=8, critic="local")
    obs = torch.randn(4, sc.obs_size)
    mask = torch.ones(4, sc.n_actions, dtype=torch.bool)
    unit = torch.zeros(4, dtype=torch.int64)
    actions = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        logp = torch.log_softmax(policy.actor_step(obs, mask, unit)[0], 1).gather(1, actions[:, None]).squeeze(1)
    mb = dict(obs=obs, mask=mask, unit=unit, actions=actions, advantages=torch.ones(4),
              returns=torch.zeros(4), old_values=torch.zeros(4), active=torch.ones(4, dtype=torch.bool))

    def actor_grad(old_log_prob):
        policy.zero_grad()
        loss, stats = ppo_loss(policy, {**mb, "old_log_prob": old_log_prob}, clip_coef=0.2, vf_coef=0.0,
                               ent_coef=0.0, clip_vloss=True)
        loss.backward()
        return policy.actor_head.weight.grad.abs().sum(), stats

    inside, stats = actor_grad(logp)
    assert inside > 0 and float(stats["clipfrac"]) == 0.0
    outside, stats = actor_grad(logp - 1.0)  # ratio e > 1.2 with a positive advantage: clipped, no gradient
    assert outside == 0 and float(stats["clipfrac"]) == 1.0


def test_dead_units_do_not_contribute():
    sc = load_scenario("3m")
    torch.manual_seed(0)
    policy = Policy.for_scenario(sc, hidden=8, critic="local")
    gen = torch.Generator().manual_seed(0)
    mb = dict(obs=torch.randn(6, sc.obs_size, generator=gen), mask=torch.ones(6, sc.n_actions, dtype=torch.bool),
              unit=torch.arange(6) % 3, actions=torch.arange(6), old_log_prob=-torch.rand(6, generator=gen) - 1,
              advantages=torch.randn(6, generator=gen), returns=torch.randn(6, generator=gen),
              old_values=torch.randn(6, generator=gen), active=torch.tensor([True, True, True, False, False, False]))
    loss_all, _ = ppo_loss(policy, mb, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, clip_vloss=True)
    live = {k: v[:3] for k, v in mb.items()}
    loss_live, _ = ppo_loss(policy, live, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, clip_vloss=True)
    assert torch.allclose(loss_all, loss_live)
    mb["advantages"][3:] = 1e6  # whatever a dead unit's row holds changes nothing
    assert torch.allclose(ppo_loss(policy, mb, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, clip_vloss=True)[0], loss_live)


def test_training_beats_random_play(tmp_path):
    """A short run on 3m must clearly beat the random policy it starts near (greedy, same games)."""
    sc = load_scenario("3m")
    cfg = tiny_cfg(tmp_path, envs=128, hidden=32, steps=128 * 8 * 30, eval_every=10 ** 9, eval_episodes=64)
    result = train(cfg)
    random_play = evaluate(None, sc, 64, 0, baseline="random")
    trained = evaluate(result.policy, sc, 64, 0)
    assert trained["mean_return"] > random_play["mean_return"] + 3.0
    assert trained["win_rate"] == result.summary["final_eval_win_rate"]  # the run's own eval: same games


@pytest.mark.parametrize("scenario,sharing,critic,recurrent", [
    ("2s3z", "shared", "central", False),
    ("2s3z", "per-type", "local", False),
    ("3m", "independent", "central", False),
    ("3m", "shared", "local", True),
    ("2s3z", "per-type", "central", True),
])
def test_every_sharing_mode_and_critic_trains_and_saves(tmp_path, scenario, sharing, critic, recurrent):
    cfg = tiny_cfg(tmp_path, scenario=scenario, sharing=sharing, critic=critic, recurrent=recurrent, envs=16,
                   agent_id=True, unit_type=True)
    torch.manual_seed(cfg.seed)  # the same init that train() starts from
    before = Policy.for_scenario(load_scenario(scenario), sharing=sharing, critic=critic, hidden=16, agent_id=True,
                                 unit_type=True, recurrent=recurrent)
    result = train(cfg)
    s = result.summary
    assert s["steps"] == cfg.steps and s["version"] == 1 and 0.0 <= s["final_eval_win_rate"] <= 1.0
    loaded = ModelRepository(cfg.models).load("m")
    assert loaded.card["sharing"] == sharing and loaded.card["critic"] == critic
    assert loaded.card["step"] == cfg.steps and loaded.card["eval_win_rate"] == s["final_eval_win_rate"]
    assert loaded.policy.recurrent == recurrent
    training = loaded.card["training"]  # how it was learned, for whoever serves it later
    assert (training["envs"], training["lr"], training["seed"], training["sharing"], training["critic"],
            training["steps"], training["world_size"]) == (16, cfg.lr, cfg.seed, sharing, critic, cfg.steps, 1)
    assert not {"models", "name", "log_dir", "metrics_port"} & set(training)
    # parameters moved from the very init the run started from, and the value normaliser saw the returns
    assert torch.equal(Policy.from_config(loaded.card["architecture"]).slot_group, before.slot_group)
    for name in ("actor_in.weight", "actor_head.weight", "critic_head.weight"):
        assert not torch.equal(loaded.policy.state_dict()[name], before.state_dict()[name]), name
    assert float(loaded.policy.value_norm.debias) > 0


def test_target_win_rate_stops_early_and_resume_continues(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=32 * 8 * 40, eval_every=32 * 8 * 2, target_win_rate=0.01)
    run = train(cfg)  # a low target that a few updates reach: the run must stop at that evaluation
    first = run.summary
    assert first["reached_target"] and first["steps"] < cfg.steps and first["steps"] % (32 * 8 * 2) == 0
    assert first["version"] == len(run.history) == first["steps"] // (32 * 8 * 2)
    assert first["final_eval_win_rate"] >= 0.01 and all(r["win_rate"] < 0.01 for r in run.history[:-1])
    resumed = train(tiny_cfg(tmp_path, steps=32 * 8 * 2, eval_every=10 ** 9, resume="latest")).summary
    assert resumed["steps"] == first["steps"] + 32 * 8 * 2 and resumed["version"] == first["version"] + 1
    card = ModelRepository(cfg.models).load("m").card
    assert card["resumed_from"] == first["version"] and card["step"] == resumed["steps"]
    # the log continues the curve rather than starting over: steps, samples and minutes run on
    rows = list(csv.DictReader(open(resumed["csv"])))
    assert [int(r["steps"]) for r in rows] == [h["steps"] for h in run.history] + [resumed["steps"]]
    samples, minutes = ([float(r[key]) for r in rows] for key in ("samples", "minutes"))
    assert samples == sorted(samples) and samples[-1] > samples[-2] and minutes == sorted(minutes)
    assert card["samples"] == int(rows[-1]["samples"]) == resumed["samples"]  # the summary counts as they do
    assert resumed["run_steps"] == 32 * 8 * 2 and 0 < resumed["run_samples"] < resumed["samples"]
    assert resumed["samples"] == first["samples"] + resumed["run_samples"]
    # resuming an earlier version replaces what followed it in the log; the whole earlier log is kept aside
    again = train(tiny_cfg(tmp_path, steps=32 * 8 * 2, eval_every=10 ** 9, resume="1")).summary
    rows = list(csv.DictReader(open(again["csv"])))
    assert [int(r["steps"]) for r in rows] == [run.history[0]["steps"], run.history[0]["steps"] + 32 * 8 * 2]
    (aside,) = Path(again["csv"]).parent.glob("m-3m.csv.*")
    assert len(list(csv.DictReader(open(aside)))) == len(run.history) + 1
    # so does a fresh run under the same name: its curve starts over, the old one is not erased
    train(tiny_cfg(tmp_path, steps=32 * 8, eval_every=10 ** 9))
    assert len(list(Path(again["csv"]).parent.glob("m-3m.csv.*"))) == 2
    with pytest.raises(TrainError, match="trained on spec"):
        train(tiny_cfg(tmp_path, scenario="8m", resume="1"))


def _adam_steps(repo: ModelRepository, version: int) -> set[float]:
    return {float(v) for k, v in repo.load_optimizer_state("m", version).items() if k.endswith(".step")}


def test_resume_continues_adam_where_the_stored_run_left_it(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, steps=32 * 8 * 2, eval_every=32 * 8 * 2)  # 2 iterations x 2 epochs x 2 minibatches
    train(cfg)
    repo = ModelRepository(cfg.models)
    stored = repo.load_optimizer_state("m", 1)
    names = {name for name, _ in repo.load("m", 1).policy.named_parameters()}
    assert {key.rsplit(".", 1)[0] for key in stored} == names and _adam_steps(repo, 1) == {8.0}
    train(tiny_cfg(tmp_path, steps=32 * 8, eval_every=10 ** 9, resume="latest"))  # 4 more updates
    assert _adam_steps(repo, 2) == {12.0}  # counted on: a fresh Adam would say 4
    assert "Adam starts afresh" not in capsys.readouterr().err
    # an unusable or absent optimizer file: the run resumes with a fresh Adam and says why
    (Path(cfg.models) / "m" / "2" / "optimizer.safetensors").write_bytes(b"\x00" * 40)
    train(tiny_cfg(tmp_path, steps=32 * 8, eval_every=10 ** 9, resume="2"))
    assert _adam_steps(repo, 3) == {4.0}
    assert "Adam starts afresh" in (err := capsys.readouterr().err) and "not a valid safetensors" in err
    (Path(cfg.models) / "m" / "3" / "optimizer.safetensors").unlink()
    train(tiny_cfg(tmp_path, steps=32 * 8, eval_every=10 ** 9, resume="3"))
    assert _adam_steps(repo, 4) == {4.0} and "stores no optimizer state" in capsys.readouterr().err


def test_restored_adam_state_takes_the_same_step_as_the_uninterrupted_optimizer():
    sc = load_scenario("3m")
    torch.manual_seed(0)
    policy = Policy.for_scenario(sc, hidden=8)
    obs, state = torch.randn(16, sc.obs_size), torch.randn(16, sc.state_size)
    mask, unit = torch.ones(16, sc.n_actions, dtype=torch.bool), torch.arange(16) % sc.n_agents

    def step(net, opt):
        logits, values = net(obs, mask, unit, state)
        opt.zero_grad()
        (logits.logsumexp(1).mean() + values.square().mean()).backward()
        opt.step()

    opt = torch.optim.Adam(policy.parameters(), lr=1e-2, eps=1e-5)
    for _ in range(3):
        step(policy, opt)
    copy = Policy.from_config(policy.config)
    copy.load_state_dict(policy.state_dict())
    copy_opt = torch.optim.Adam(copy.parameters(), lr=1e-2, eps=1e-5)
    assert restore_adam_state(copy_opt, copy, adam_state(opt, policy)) == []
    step(policy, opt)
    step(copy, copy_opt)
    for (name, a), b in zip(policy.named_parameters(), copy.parameters()):
        assert torch.equal(a, b), name
    # state for another architecture, or with broken values, restores nothing and says what does not fit
    other = Policy.for_scenario(sc, hidden=4)
    other_opt = torch.optim.Adam(other.parameters())
    assert any("stored shape" in why for why in restore_adam_state(other_opt, other, adam_state(opt, policy)))
    broken = adam_state(opt, policy)
    broken["actor_head.bias.exp_avg"].fill_(float("nan"))
    copy_opt = torch.optim.Adam(copy.parameters())
    assert restore_adam_state(copy_opt, copy, broken) == ["actor_head.bias (values out of range)"]
    assert not other_opt.state and not copy_opt.state


def test_target_window_stops_when_the_mean_of_the_last_evaluations_reaches_the_target(tmp_path):
    target = 0.3  # each evaluation's 16 games give a coarse, swinging win rate: the window matters
    run = train(tiny_cfg(tmp_path, steps=32 * 8 * 60, eval_every=32 * 8 * 2, target_win_rate=target,
                         target_window=3))
    rates = [r["win_rate"] for r in run.history]
    means = [sum(rates[i - 2:i + 1]) / 3 for i in range(2, len(rates))]
    assert run.summary["reached_target"] and len(rates) >= 3
    assert means[-1] >= target and all(m < target for m in means[:-1])  # stopped at the first window there
    assert any(r >= target for r in rates[:-1])  # where a window of 1 would have stopped earlier


def test_entropy_bonus_anneals_to_its_final_value_over_the_budget(tmp_path):
    # six iterations, an evaluation after every second: each row carries the bonus of its last iteration,
    # whose budget fraction is (iteration - 1) / 6
    run = train(tiny_cfg(tmp_path, steps=32 * 8 * 6, eval_every=32 * 8 * 2, ent_coef=0.06, ent_coef_final=0.0))
    assert [r["ent_coef"] for r in run.history] == pytest.approx([0.06 * (1 - f / 6) for f in (1, 3, 5)])
    constant = train(tiny_cfg(tmp_path, name="c", steps=32 * 8 * 4, eval_every=32 * 8 * 2, ent_coef=0.06,
                              ent_coef_final=None))
    assert [r["ent_coef"] for r in constant.history] == [0.06, 0.06]


def test_actor_row_probes_keep_the_rows_they_name(tmp_path):
    # the sharing bench's probes: one live unit per game step, or whole game steps with as many samples
    torch.manual_seed(0)
    alive = torch.rand(16, 64, 8) < 0.6
    alive[0, 0] = False  # a game step with no live unit
    assert torch.equal(select_actor_rows(alive, "all"), alive)
    one = select_actor_rows(alive, "one-unit")
    assert not (one & ~alive).any() and torch.equal(one.sum(2), alive.any(2).long())
    assert len(set(one.float().argmax(2)[alive.any(2)].tolist())) == 8  # the unit is drawn, not always slot 0
    games = select_actor_rows(alive, "game-subset")
    kept_steps = games.any(2)
    assert not (games & ~alive).any() and torch.equal(games[kept_steps], alive[kept_steps])
    assert abs(int(games.sum()) - int(one.sum())) < 0.15 * int(one.sum())
    run = train(tiny_cfg(tmp_path, actor_rows="one-unit"))  # and a training run takes it
    assert run.summary["steps"] == 32 * 8 * 3


@pytest.mark.parametrize("field,value,message", [
    ("envs", 0, "--envs must be >= 1"), ("sharing", "all", "--sharing must be one of"),
    ("target_win_rate", 1.5, "--target-win-rate"), ("resume", "newest", "--resume must be"),
    ("name", "../x", "--name"), ("device", "tpu", "--device"), ("ent_coef_final", -0.1, "--ent-coef-final"),
    ("actor_rows", "half", "actor_rows must be one of"), ("target_window", 0, "--target-window must be >= 1"),
])
def test_bad_config_names_the_flag(tmp_path, field, value, message):
    with pytest.raises(TrainError, match=message):
        tiny_cfg(tmp_path, **{field: value})


def test_local_critic_returns_run_through_a_units_death():
    """Unit 0 dies at step 1; the team wins at step 3. With a local critic unit 0's early actions still earn
    the win (the same advantage as its surviving mate), as they do under the central critic."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0], [0.0], [0.0], [1.0]])  # (T=4, E=1)
    dones = torch.tensor([[False], [False], [False], [True]])
    local = team_gae(rewards, torch.zeros(4, 1, 2), torch.zeros(1, 2), dones, gamma, lam)
    central = team_gae(rewards, torch.zeros(4, 1), torch.zeros(1), dones, gamma, lam)
    assert local.shape == (4, 1, 2)
    assert torch.allclose(local[:, :, 0], central) and torch.allclose(local[:, :, 1], central)
    assert local[0, 0, 0].item() == pytest.approx((gamma * lam) ** 3)


def test_a_rollout_with_one_live_unit_trains_and_saves_finite_weights(tmp_path):
    """One game, one step per rollout: once a 3m game is down to its last marine the batch holds one live sample,
    whose advantage has no spread to normalise by (it used to become NaN and be saved)."""
    cfg = tiny_cfg(tmp_path, envs=1, rollout=1, epochs=1, minibatches=1, steps=300, eval_every=100, eval_episodes=2)
    train(cfg)
    repo = ModelRepository(cfg.models)
    assert repo.versions("m") == [1, 2, 3]
    for v in repo.versions("m"):
        repo.load("m", v)  # refuses non-finite weights


def test_a_diverging_run_stops_without_saving_a_broken_version(tmp_path):
    with pytest.raises(TrainError, match="diverged at step .*no longer finite.*version 1 is the last good one"):
        cfg = tiny_cfg(tmp_path, steps=32 * 8 * 3, eval_every=32 * 8)
        train(cfg)  # three good versions, then resume with a learning rate that blows the weights up
        train(tiny_cfg(tmp_path, resume="1", lr=1e30, steps=32 * 8 * 3, eval_every=32 * 8))
    assert ModelRepository(cfg.models).versions("m") == [1, 2, 3]


def test_a_resumed_run_that_ends_below_its_start_says_so(tmp_path, capsys):
    """A short resume restarts the schedules and can end worse than the version it began from; the run warns,
    naming its best version, since a service following the name would swap the worse one in."""
    import json

    train(tiny_cfg(tmp_path))
    card_path = tmp_path / "models" / "m" / "1" / "card.json"
    card = json.loads(card_path.read_text())
    card["eval_win_rate"] = 1.0  # the start to beat: no tiny run gets there
    card_path.write_text(json.dumps(card))
    capsys.readouterr()
    train(tiny_cfg(tmp_path, resume="1"))
    err = capsys.readouterr().err
    assert "train: warning: the last version (2) evaluates below version 1, which this run resumed from" in err
    assert "(was 1.000)" in err and "this run's best was" in err
    train(tiny_cfg(tmp_path, resume="1", eval_episodes=8))  # other games: not comparable, no warning
    assert "warning" not in capsys.readouterr().err


def test_a_run_that_fails_lets_go_of_its_name(tmp_path, monkeypatch):
    """The claim on a name is released however a run ends: a failed run in a long-lived process (a notebook, a
    benchmark driver) must not leave the name locked against the next run."""
    import trainer.ppo as ppo

    real_evaluate = ppo.evaluate

    def broken(*args, **kw):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(ppo, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation broke") as failed:
        train(tiny_cfg(tmp_path))
    monkeypatch.setattr(ppo, "evaluate", real_evaluate)
    assert failed.value is not None  # the traceback (and its frames) still alive, as a caller would keep it
    assert train(tiny_cfg(tmp_path)).summary["version"] == 1


def test_graceful_stop_takes_a_repeat_soon_after_as_the_same_stop_and_a_later_one_as_quit():
    """SLURM's scancel signals every process of a job and torchrun passes its signal on too: a rank gets the same
    stop twice within moments, which must not cut short the last evaluation and save. A signal later on is the
    user insisting. Handlers are undone after."""
    import os
    import signal
    import time

    from trainer.ppo import GracefulStop

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop(repeat_after=0.3) as graceful:
        os.kill(os.getpid(), signal.SIGTERM)
        assert graceful.signal == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher passing the same stop on
        os.kill(os.getpid(), signal.SIGINT)
        assert graceful.signal == signal.SIGTERM
        time.sleep(0.4)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_long_evaluation_plays_in_batches_the_same_games_it_would_play_at_once(monkeypatch):
    """Memory is bounded by EVAL_UNITS_AT_ONCE, not by --episodes; a game's course comes from its own seed, so the
    batches change nothing for greedy play or a deterministic baseline, and progress is reported between them."""
    import trainer.ppo
    from trainer.policy import Policy
    from trainer.sim import load_scenario

    sc = load_scenario("3m")
    torch.manual_seed(3)
    policy = Policy.for_scenario(sc, hidden=16)
    at_once = {who: evaluate(policy if who == "model" else None, sc, 23, 5, baseline=None if who == "model" else who)
               for who in ("model", "focus-fire")}
    monkeypatch.setattr(trainer.ppo, "EVAL_UNITS_AT_ONCE", 5 * (sc.n_agents + sc.n_enemies))  # 5 games a batch
    seen = []
    batched = {who: evaluate(policy if who == "model" else None, sc, 23, 5, baseline=None if who == "model" else who,
                             progress=lambda done, totals: seen.append(done)) for who in ("model", "focus-fire")}
    assert seen == [5, 10, 15, 20, 23] * 2
    for who in at_once:
        assert batched[who] == pytest.approx(at_once[who]), who
    assert 0 < at_once["model"]["mean_length"] and at_once["focus-fire"]["win_rate"] != at_once["model"]["win_rate"]
