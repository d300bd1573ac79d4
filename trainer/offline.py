"""Offline PPO: learn the shared policy from experience the service logged (shard files, trainer/shards.py).

One run, top to bottom in `train_offline`:

1. read     every shard, validated against the scenario's spec; rows sorted into per-unit trajectories
2. policy   fresh (local critic), or resumed from a stored version; a central critic cannot learn here (the
            service logs each unit's own observation, never the global state), so a resumed MAPPO model keeps
            its actor and gets a fresh local critic
3. iterate  I times: (a) the current policy's log-probs and values on every logged row, (b) V-trace targets and
            advantages, (c) K epochs x M minibatches of PPO updates on the shared parameters, (d) log
4. save     greedy evaluation on the simulator, then a new model version, exactly as online training saves one

Off-policy correction. The logged actions come from a behaviour policy mu (the model versions that served them,
sampled or greedy) that is not the policy pi being learned, and pi drifts further from mu with every update.
The learner uses V-trace (Espeholt et al. 2018, IMPALA) for its targets and advantages:

    rho_s = min(rho_bar, pi(a_s|x_s) / mu(a_s|x_s)),   c_s = lambda * min(c_bar, pi(a_s|x_s) / mu(a_s|x_s))
    v_s   = V(x_s) + delta_s + gamma * c_s * (v_{s+1} - V(x_{s+1})),  delta_s = rho_s (r_s + gamma V(x_{s+1}) - V(x_s))
    A_s   = rho_s (r_s + gamma v_{s+1} - V(x_s))

and PPO's clipped surrogate, with the ratio taken against the policy at the start of the iteration (pi_old),
around those advantages. Why this and not PPO's ratio against the logged log-prob: the truncated weights rho and c
keep the variance bounded however far pi is from mu (plain importance ratios explode), v_s is a consistent value
target for pi itself (not for mu, as GAE on logged values would be), and clipping against pi_old keeps each
iteration's step a trust region while V-trace does the correcting. Clipping against mu instead would freeze
learning once pi had moved clip_coef away from the behaviour, and is undefined for greedy serving: an argmax has
probability 1 under the behaviour, not the softmax probability the service reports, so greedy rows count with
mu(a|x) = 1 (trainer/shards.py does that).

Trajectory ends: a row whose step ended the unit's episode (done) has no successor value; a trajectory's last row
that did not (its reward never came, or the next step was not logged) is no sample - it only lends its value
V(x) as the bootstrap of the row before it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from trainer.config import OfflineConfig, TrainError, training_settings
from trainer.policy import Policy
from trainer.ppo import (GracefulStop, TrainResult, _prior_rows, _save, _write_csv, evaluate, ppo_loss,
                         prepare_outputs, weights_finite)
from trainer.repository import ModelRepository
from trainer.shards import read_shards
from trainer.sim import load_scenario


# --- V-trace ----------------------------------------------------------------------------------------------------

def backward_plan(has_next: torch.Tensor) -> list[torch.Tensor]:
    """Rows grouped by their distance from the end of their chain (rows linked by has_next): plan[k] holds the
    rows k steps before the end. Walking k = 0, 1, 2, ... every row comes after its successor. The last row must
    end a chain (has_next[-1] false)."""
    R = has_next.shape[0]
    if R and bool(has_next[-1]):
        raise ValueError("has_next of the last row must be false: nothing follows it")
    ends = torch.nonzero(~has_next).squeeze(1)  # the last row of every chain (the last row of all is one)
    dist = ends[torch.searchsorted(ends, torch.arange(R))] - torch.arange(R)
    order = torch.argsort(dist, stable=True)
    return list(torch.split(order, torch.bincount(dist).tolist()))


def vtrace(log_ratio: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor, has_next: torch.Tensor,
           sample: torch.Tensor, plan: list[torch.Tensor], *, gamma: float, lam: float, rho_bar: float = 1.0,
           c_bar: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace value targets v_s and policy-gradient advantages over rows sorted by trajectory, then step.

    All (R,): log_ratio = log pi(a|x) - log mu(a|x); values = V(x) (in reward units); has_next: row s + 1 is the
    same trajectory's next step; sample: the row has its reward (non-samples get v = V, advantage 0).
    -> (vs (R,), advantages (R,))."""
    ratio = log_ratio.exp()
    rho, c = ratio.clamp(max=rho_bar), lam * ratio.clamp(max=c_bar)
    cont = gamma * has_next.to(values.dtype)  # 0 where the trajectory ends (done) or was cut
    shift = torch.arange(1, values.shape[0] + 1, device=values.device).clamp(max=values.shape[0] - 1)  # index of row s + 1 (clamped)
    next_values = values[shift] * has_next
    delta = torch.where(sample, rho * (rewards + cont * next_values - values), torch.zeros_like(values))
    diff = torch.zeros_like(values)  # v_s - V(x_s)
    for rows in plan:
        diff[rows] = delta[rows] + cont[rows] * c[rows] * diff[shift[rows]]
    vs = values + diff
    advantages = torch.where(sample, rho * (rewards + cont * vs[shift] * has_next - values), torch.zeros_like(values))
    return vs, advantages


# --- the learner ------------------------------------------------------------------------------------------------

def with_local_critic(policy: Policy) -> Policy:
    """The policy itself if its critic is local; otherwise the same actor with a fresh local critic."""
    if policy.critic == "local":
        return policy
    local = Policy.from_config({**policy.config, "critic": "local"})
    actor = {k: v for k, v in policy.state_dict().items() if k.startswith("actor_")}
    local.load_state_dict(actor, strict=False)
    return local


@torch.no_grad()
def _score(policy: Policy, obs: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor, action: torch.Tensor,
           chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's log-prob of every logged action and its normalised value of every row: (R,), (R,)."""
    log_probs, values = [], []
    for i in range(0, obs.shape[0], chunk):
        s = slice(i, i + chunk)
        logits, v = policy(obs[s], mask[s], unit[s], obs[s], unit[s])
        log_probs.append(torch.log_softmax(logits, 1).gather(1, action[s, None]).squeeze(1))
        values.append(v)
    return torch.cat(log_probs), torch.cat(values)


class StoppedBeforeLearning(TrainError):
    """A SIGINT / SIGTERM arrived before the actor's first update (while the shards were read, or a fresh critic
    warmed up): the actor is the untrained one, so there is nothing worth a version; `signum` gives the exit
    status (128 + signum)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def train_offline(cfg: OfflineConfig, *, metrics=None) -> TrainResult:
    """Learn from logged shards as configured; returns the summary (the CLI's final JSON line), policy, history.
    A first SIGINT or SIGTERM ends the run after its iteration: evaluated and saved as at the end (summary
    "stop_reason" names the signal) once the actor has learned, StoppedBeforeLearning before that."""
    plan = "stopping after this iteration with a last evaluation and version (none before the actor's first update)"
    with GracefulStop(plan=plan) as graceful, contextlib.ExitStack() as held:  # held: the claim on the name
        return _train_offline(cfg, metrics, graceful, held)


def _train_offline(cfg: OfflineConfig, metrics, graceful: GracefulStop, held: contextlib.ExitStack) -> TrainResult:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for, but torch sees no CUDA device")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    repo = ModelRepository(cfg.models)

    # --- 1. read: the scenario fixes the spec (or the shards name it) ----------------------------------------
    if cfg.scenario is not None:
        sc = load_scenario(cfg.scenario, files=cfg.scenario_files)
        data = read_shards(cfg.shards, spec_hash=sc.spec_hash)
    else:
        data = read_shards(cfg.shards)
        sc = load_scenario(data.spec_name, files=cfg.scenario_files)
        if sc.spec_hash != data.spec_hash:
            raise TrainError(f"--from-shards: the shards were logged under spec {data.spec_name!r} (hash "
                             f"{data.spec_hash}), but scenario {sc.name!r} here has hash {sc.spec_hash}; pass the "
                             f"--scenario-file that defines it")
    if data.rows and int(data.unit.max()) >= sc.n_agents:
        raise TrainError(f"--from-shards: unit_id {int(data.unit.max())} is not an agent slot of scenario {sc.name} "
                         f"(0..{sc.n_agents - 1})")
    if data.samples == 0:
        raise TrainError(f"--from-shards: {len(data.files)} shard file(s), {data.rows} rows, but no learning sample: "
                         "every trajectory ended without its reward (truncated); clients must send prev_reward / "
                         "prev_done on the next request of each unit")
    sampled = data.sample
    if not bool((data.reward[sampled] != 0).any()) and not bool(data.done.any()):
        # legal (absent fields count as 0 / false) but almost surely a client that never sends them: learning
        # would only fit the critic to zero and push the actor about on noise
        print(f"offline: warning: all {data.samples} samples have reward 0 and no episode ended in them; do the "
              "game clients send prev_reward / prev_done with each unit's next request?", file=sys.stderr)
    dev = torch.device(cfg.device)

    # --- 2. policy: fresh or resumed, always with a local critic ------------------------------------------------
    start_step, resumed_from = 0, None
    if cfg.resume is not None:
        version = repo.latest(cfg.name) if cfg.resume == "latest" else int(cfg.resume)
        if version is None:
            raise TrainError(f"--resume latest: model {cfg.name!r} has no version under {cfg.models}")
        loaded = repo.load(cfg.name, version)
        mismatch = loaded.spec_mismatch(sc)
        if mismatch:
            raise TrainError(f"--resume: {mismatch}, the spec the shards carry")
        if loaded.policy.recurrent:
            raise TrainError(f"--resume: version {version} of {cfg.name!r} is recurrent; logged experience holds "
                             "single steps of feed-forward policies, so it cannot continue a GRU policy")
        policy, start_step, resumed_from = with_local_critic(loaded.policy), int(loaded.card["step"]), version
        fresh_critic = loaded.policy.critic != "local"
    else:
        fresh_critic = True
        policy = Policy.for_scenario(sc, sharing=cfg.sharing, critic="local", hidden=cfg.hidden,
                                     agent_id=cfg.agent_id, unit_type=cfg.unit_type)
    policy = policy.to(dev).train()
    # a fresh Adam even when resuming (and none stored): learning from a fixed log is another problem, with its own
    # critic and targets, and an online run's moments would scale its first steps by that run's gradients
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    data_d = {k: getattr(data, k).to(dev) for k in ("obs", "mask", "unit", "action", "behaviour_log_prob", "reward",
                                                    "has_next", "sample")}
    plan = [rows.to(dev) for rows in backward_plan(data.has_next)]
    samples = torch.nonzero(data_d["sample"]).squeeze(1)
    n = samples.shape[0]
    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(cfg.models) / cfg.name / "logs"
    held.enter_context(prepare_outputs(repo, cfg.name, log_dir, sc))
    csv_path = log_dir / f"{cfg.name}-{sc.name}-offline.csv"
    history: list[dict] = []
    prior = _prior_rows(csv_path)  # earlier offline runs of this name: the log grows, one block of rows a run
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)

    # the policy it starts from, on the games the result will be judged on: learning from a fixed log can make a
    # trained policy worse, and the summary should say so rather than let the new version pass for progress
    start_ev = evaluate(policy, sc, cfg.eval_episodes, cfg.seed, device=dev) if resumed_from is not None else None

    # --- 3. iterate: score, V-trace, PPO updates, log (a fresh critic learns alone first) -------------------------
    warmup = cfg.critic_warmup if fresh_critic else 0
    actor_params = [p for name, p in policy.named_parameters() if name.startswith("actor_")]
    stop_reason, learned = "iterations", 0

    def stop_before_learning(it: int) -> None:
        if graceful.signal is not None and learned == 0:  # the actor is the untrained one: no version worth saving
            done = f" ({it} of {warmup} critic warm-up iterations done)" if warmup else ""
            raise StoppedBeforeLearning(f"{signal.Signals(graceful.signal).name} before the actor's first update"
                                        f"{done}: no version was saved", graceful.signal)

    for it in range(warmup + cfg.iterations):
        stop_before_learning(it)
        if graceful.signal is not None:
            stop_reason = signal.Signals(graceful.signal).name
            break
        actor_learns = it >= warmup
        lr = cfg.lr * (1.0 - (it - warmup) / cfg.iterations) if cfg.anneal_lr and actor_learns else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        policy.eval()
        old_log_prob, old_values_n = _score(policy, data_d["obs"], data_d["mask"], data_d["unit"], data_d["action"])
        with torch.no_grad():
            values = policy.value_norm.denormalize(old_values_n)
            log_ratio = old_log_prob - data_d["behaviour_log_prob"]
            vs, adv = vtrace(log_ratio, data_d["reward"], values, data_d["has_next"], data_d["sample"], plan,
                             gamma=cfg.gamma, lam=cfg.lam, rho_bar=cfg.rho_bar, c_bar=cfg.c_bar)
            policy.value_norm.update(vs[samples])
            returns_n = policy.value_norm.normalize(vs)
            old_values_n = policy.value_norm.normalize(values)  # the previous prediction, in the updated units
            adv_s = adv[samples]
            adv_n = (adv_s - adv_s.mean()) / (adv_s.std() + 1e-8) if n > 1 else adv_s
            if not actor_learns:  # no policy gradient and no bonus: the actor's gradient is exactly zero
                adv_n = torch.zeros_like(adv_n)
        policy.train()
        rows = dict(obs=data_d["obs"][samples], mask=data_d["mask"][samples], unit=data_d["unit"][samples],
                    actions=data_d["action"][samples], old_log_prob=old_log_prob[samples], advantages=adv_n,
                    returns=returns_n[samples], old_values=old_values_n[samples],
                    active=torch.ones(n, dtype=torch.bool, device=dev))
        stat_sums: dict[str, float] = {}
        M = min(cfg.minibatches, n)
        for _epoch in range(cfg.epochs):
            perm = torch.randperm(n, device=dev, generator=gen)
            for m in range(M):
                idx = perm[m * n // M:(m + 1) * n // M]
                if not actor_learns:
                    stop_before_learning(it)  # a warm-up iteration's work would be thrown away: stop at once
                loss, stats = ppo_loss(policy, {k: v[idx] for k, v in rows.items()}, clip_coef=cfg.clip_coef,
                                       vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef if actor_learns else 0.0,
                                       clip_vloss=True)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not actor_learns:  # no gradient at all, not a zero one: Adam would count zero steps for the
                    for p in actor_params:  # actor and then take oversized ones once it learns
                        p.grad = None
                nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                for k, v in stats.items():
                    stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
        ratio = log_ratio[samples].exp()
        row = {"run_started": started, "iteration": it + 1, "actor_learns": actor_learns,
               "minutes": round((time.perf_counter() - t0) / 60, 4), "lr": lr,
               **{k: round(v / (cfg.epochs * M), 6) for k, v in stat_sums.items()},
               "mean_ratio_to_behaviour": round(float(ratio.mean()), 6),
               "rho_truncated_fraction": round(float((ratio > cfg.rho_bar).float().mean()), 6),
               "mean_value_target": round(float(vs[samples].mean()), 6)}
        history.append(row)
        _write_csv(csv_path, prior + history)
        if metrics is not None:
            metrics.update_iteration(steps=start_step + data.samples, samples=(it + 1) * cfg.epochs * n,
                                     agent_steps_per_s=0.0, train_win_rate=None, train_return=None, lr=lr,
                                     **{k: row[k] for k in ("pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac")})
        if cfg.progress:
            print(f"offline iteration {it + 1}/{warmup + cfg.iterations}"
                  f"{'' if actor_learns else ' (critic warm-up)'}: pg_loss {row['pg_loss']:.4f}  v_loss "
                  f"{row['v_loss']:.4f}  entropy {row['entropy']:.3f}  kl {row['approx_kl']:.4f}  ratio to "
                  f"behaviour {row['mean_ratio_to_behaviour']:.3f}", file=sys.stderr, flush=True)
        learned += actor_learns

    # --- 4. save: greedy evaluation on the simulator, then a new version ---------------------------------------
    if not weights_finite(policy):
        raise TrainError("offline training diverged: the network's weights are no longer finite; nothing was "
                         "saved (a lower --lr or --max-grad-norm may help)")
    ev = evaluate(policy, sc, cfg.eval_episodes, cfg.seed, device=dev)
    behaviour_versions = sorted({int(v) for v in data.model_version.unique().tolist()})
    offline = {"shards": len(data.files), "rows": data.rows, "samples": data.samples,
               "trajectories": data.trajectories, "iterations": learned, "behaviour_versions": behaviour_versions,
               "start_eval_win_rate": None if start_ev is None else start_ev["win_rate"]}
    version = _save(repo, cfg.name, policy, scenario=sc, step=start_step + data.samples, eval_win_rate=ev["win_rate"],
                        extra={"eval_episodes": cfg.eval_episodes, "eval_seed": cfg.seed,
                               "eval_mean_return": ev["mean_return"], "resumed_from": resumed_from,
                               "offline": offline,
                               "training": {**training_settings(cfg), "critic_warmup": warmup}})
    if metrics is not None:
        metrics.update_eval(win_rate=ev["win_rate"], mean_return=ev["mean_return"], version=version)
    elapsed = time.perf_counter() - t0
    if cfg.progress:
        print(f"offline: eval win rate {ev['win_rate']:.3f}  return {ev['mean_return']:.2f}  -> version {version}",
              file=sys.stderr, flush=True)
    if start_ev is not None and (ev["win_rate"], ev["mean_return"]) < (start_ev["win_rate"], start_ev["mean_return"]):
        print(f"offline: warning: version {version} does worse than version {resumed_from}, which it started from, "
              f"on the same {cfg.eval_episodes} games: win rate {ev['win_rate']:.3f} (was {start_ev['win_rate']:.3f}), "
              f"return {ev['mean_return']:.2f} (was {start_ev['mean_return']:.2f}); a service following "
              f"{cfg.name!r} with a --min-eval-win-rate above it will not swap it in", file=sys.stderr, flush=True)
    summary = {"mode": "offline", "scenario": sc.name, "name": cfg.name, "sharing": policy.sharing,
               "critic": policy.critic, **offline, "minutes": round(elapsed / 60, 3),
               "final_eval_win_rate": ev["win_rate"], "eval_mean_return": ev["mean_return"], "version": version,
               "resumed_from": resumed_from, "stop_reason": stop_reason, "csv": str(csv_path)}
    return TrainResult(summary, policy, history)
