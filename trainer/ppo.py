"""PPO over the pooled experience of every unit: collect, advantages, update, log, save.

One iteration, top to bottom in `train`:

1. collect  E games x T steps with the current policy; every unit's step is one sample
2. GAE      central critic: one team advantage per game step, shared by that game's live units;
            local critic: one advantage per unit, its return running to the end of the game
3. update   K epochs x M minibatches of the pooled samples; policy loss and entropy = means over live units'
            samples (dead units are masked out); clipped value loss over every game step (central) or
            every unit step, dead units' zero observations included (local)
4. log      tqdm, CSV curve, Prometheus; greedy evaluation every `eval_every` steps
5. save     a model version at every evaluation and at the end (rank 0 only)

Shapes: T rollout steps, E games, A agents, O obs, S state, N actions, H hidden.
Under `torchrun` the same function runs on every rank: each rank plays its own games (its own seeds),
DistributedDataParallel all-reduces the gradients, and rank 0 alone evaluates, logs and writes versions.
Timeouts are treated as terminal (SMAC's convention: the time limit is part of the task).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import ARCHITECTURE_FIELDS, TrainConfig, TrainError, training_settings
from trainer.policy import Policy
from trainer.repository import ModelLoadError, ModelRepository
from trainer.sim import BattleSim, load_scenario


def select_actor_rows(alive: torch.Tensor, how: str) -> torch.Tensor:
    """(T, E, A) live-unit mask -> the rows that train the actor (see TrainConfig.actor_rows)."""
    if how == "all":
        return alive
    if how == "one-unit":  # a random live unit of each game step that has one
        score = torch.rand(alive.shape, device=alive.device).masked_fill(~alive, -1.0)
        pick = score.argmax(2, keepdim=True)
        return torch.zeros_like(alive).scatter_(2, pick, True) & alive
    if how == "game-subset":  # all live units of a random share of the game steps, sized like one-unit
        share = float(alive.any(2).sum()) / max(float(alive.sum()), 1.0)
        return alive & (torch.rand(alive.shape[:2] + (1,), device=alive.device) < share)
    raise ValueError(f"unknown actor_rows {how!r}")


def target_held(history: list[dict], target: float | None, window: int) -> bool:
    """Whether the mean win rate of the last `window` evaluations of `history` reaches `target` (False while
    there are fewer evaluations than that, or without a target): the stopping rule of --target-window."""
    last = history[-window:]
    return target is not None and len(last) == window and sum(r["win_rate"] for r in last) / window >= target


# --- the loss -------------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def ppo_loss(model: nn.Module, mb: dict, *, clip_coef: float, vf_coef: float, ent_coef: float,
             clip_vloss: bool) -> tuple[torch.Tensor, dict]:
    """The PPO loss of one minibatch; every term is a mean over the live units' samples.

    mb (rows R for the actor, R' for the critic):
      obs (R, O), mask (R, N) bool, unit (R,), actions (R,), old_log_prob (R,), advantages (R,), active (R,) bool;
      recurrent actor: obs (T, B, O), mask (T, B, N), unit (B,), h0 (B, H), starts (T, B) and the per-row
      entries shaped (T, B);
      critic: its own rows when `critic_in` is given, every one counted: the state (R', S) for a central critic,
      or observations (R', O) with `critic_unit` (R',) for a local one (returns and old_values then have R'
      rows); otherwise a local critic on the actor's active rows. returns = normalised value targets,
      old_values = normalised predictions at collection.
    `model` is the Policy or a DistributedDataParallel wrapping it (its forward gives logits and values).
    """
    own_rows = "critic_in" in mb
    v_in, v_unit = (mb["critic_in"], mb.get("critic_unit")) if own_rows else (mb["obs"], mb["unit"])
    logits, newvalue = model(mb["obs"], mb["mask"], mb["unit"], v_in, v_unit, mb.get("h0"), mb.get("starts"))
    logits = logits.reshape(-1, logits.shape[-1])
    active = mb["active"].reshape(-1)
    log_probs = torch.log_softmax(logits, 1)
    newlogprob = log_probs.gather(1, mb["actions"].reshape(-1, 1)).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(1)  # masked actions: p = 0 exactly, so they add 0
    logratio = newlogprob - mb["old_log_prob"].reshape(-1)
    ratio = logratio.exp()
    adv = mb["advantages"].reshape(-1)

    pg_loss = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)), active)
    v_active = None if own_rows else active
    returns, old_values = mb["returns"].reshape(-1), mb["old_values"].reshape(-1)
    v_loss_unclipped = (newvalue - returns) ** 2
    if clip_vloss:
        v_clipped = old_values + (newvalue - old_values).clamp(-clip_coef, clip_coef)
        v_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, (v_clipped - returns) ** 2), v_active)
    else:
        v_loss = 0.5 * masked_mean(v_loss_unclipped, v_active)
    entropy_loss = masked_mean(entropy, active)
    loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss
    with torch.no_grad():
        stats = {"pg_loss": pg_loss.detach(), "v_loss": v_loss.detach(), "entropy": entropy_loss.detach(),
                 "approx_kl": masked_mean((ratio - 1) - logratio, active),
                 "clipfrac": masked_mean(((ratio - 1).abs() > clip_coef).float(), active)}
    return loss, stats


def gae(rewards: torch.Tensor, values: torch.Tensor, next_value: torch.Tensor, dones: torch.Tensor, gamma: float,
        lam: float) -> torch.Tensor:
    """Generalised advantage estimates. rewards, values, dones (T, *B) (dones[t]: the trajectory ended with
    step t), next_value (*B) the value after the last step -> advantages (T, *B)."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(values)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        nextvalues = next_value if t == T - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t].to(values.dtype)
        delta = rewards[t] + gamma * nextvalues * nonterminal - values[t]
        lastgaelam = delta + gamma * lam * nonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages


def team_gae(rewards: torch.Tensor, values: torch.Tensor, next_value: torch.Tensor, dones: torch.Tensor,
             gamma: float, lam: float) -> torch.Tensor:
    """GAE for the team reward. rewards, dones (T, E); values (T, E) and next_value (E,) from a central critic,
    or (T, E, A) and (E, A) from a local one, whose every unit then gets the team's rewards until the game ends.

    A local critic's returns run through the unit's death (SMAC zeroes a dead unit's observation, and the
    critic learns what the team still earns after it), so a unit that dies in a won fight shares the win.
    Ending its return at its death taught survival instead of winning: 3m reached 34% after 3 minutes that
    way, 95% this way."""
    if values.dim() == 3:
        rewards, dones = (x[:, :, None].expand_as(values) for x in (rewards, dones))
    return gae(rewards, values, next_value, dones, gamma, lam)


# --- evaluation (shared with `phalanx eval`; `phalanx play` reproduces it through the service) ---------------

@torch.no_grad()
def policy_actions(policy: Policy, obs: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor,
                   greedy: torch.Tensor, generator: torch.Generator, h: torch.Tensor | None):
    """One step's actions for rows (B,) as evaluation plays them: `policy.act`, or for a recurrent actor (the
    trainer's own view) its step with the hidden state `h` carried. -> (actions (B,), h)."""
    if not policy.recurrent:
        return policy.act(obs, mask, unit, greedy, generator=generator).action, h
    logits, h = policy.actor_step(obs, mask, unit, h)
    sampled = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
    return torch.where(greedy, logits.argmax(1), sampled), h


EVAL_STATS = ("won", "timeout", "episode_return", "episode_length", "allies_left", "enemies_left")
"""The first-episode statistics `evaluate` gathers per game (StepOutput fields)."""
EVAL_UNITS_AT_ONCE = 65_536
"""Units (both sides) that `evaluate` steps at once: games beyond that are played in further batches, so 100,000
games of 27m_vs_30m take bounded memory (8m: 4,096 games a batch, near the simulator's best throughput)."""


def evaluate(policy: Policy | None, scenario, episodes: int, seed: int, *, greedy: bool = True,
             baseline: str | None = None, device: str | torch.device = "cpu",
             progress: Callable[[int, dict], None] | None = None) -> dict:
    """Play `episodes` games, game i with seed `seed + i` (BattleSim), and count the first episode of each.
    Actions: `policy.act` over every agent slot (dead agents' masks force no-op), greedy or sampled, or a scripted
    `baseline` from trainer.sim.baselines. Games are played in batches of EVAL_UNITS_AT_ONCE units. A game's own
    randomness comes from its seed, so greedy play and attack-nearest / focus-fire give the same games in any
    batch; sampled actions and the `random` baseline draw from one generator per batch (the batch that starts at
    game k seeds it with `seed + k`), so theirs depend on the batch size. `progress(games_done, totals)` follows
    each batch.
    -> {win_rate, episodes, mean_return, mean_length, mean_allies_left, mean_enemies_left, timeouts}."""
    per_batch = max(1, EVAL_UNITS_AT_ONCE // (scenario.n_agents + scenario.n_enemies))
    totals = dict.fromkeys(EVAL_STATS, 0.0)
    was_training = policy.training if policy is not None else False
    if policy is not None:
        policy.eval()
    try:
        for first_game in range(0, episodes, per_batch):
            n = min(per_batch, episodes - first_game)
            batch = _play_first_episodes(policy, scenario, n, seed + first_game, greedy, baseline, device)
            for k in EVAL_STATS:
                totals[k] += float(batch[k].sum())
            if progress is not None:
                progress(first_game + n, totals)
    finally:
        if policy is not None and was_training:
            policy.train()
    return {"win_rate": totals["won"] / episodes, "episodes": episodes,
            "mean_return": totals["episode_return"] / episodes, "mean_length": totals["episode_length"] / episodes,
            "mean_allies_left": totals["allies_left"] / episodes,
            "mean_enemies_left": totals["enemies_left"] / episodes, "timeouts": int(totals["timeout"])}


@torch.no_grad()
def _play_first_episodes(policy: Policy | None, scenario, n: int, seed: int, greedy: bool, baseline: str | None,
                         device) -> dict[str, torch.Tensor]:
    """One batch of `evaluate`: n games at once from `seed`; each game's first-episode statistics, (n,) each."""
    from trainer.sim.baselines import BASELINES

    sim = BattleSim(scenario, n, seed=seed, device=device)
    out = sim.reset()
    A = scenario.n_agents
    unit = torch.arange(A, device=sim.device).repeat(n)
    greedy_t = torch.full((n * A,), greedy, dtype=torch.bool, device=sim.device)
    gen = torch.Generator(device=sim.device).manual_seed(seed)
    finished = torch.zeros(n, dtype=torch.bool, device=sim.device)
    result = {k: torch.zeros(n, dtype=torch.float32, device=sim.device) for k in EVAL_STATS}
    h = None
    while not bool(finished.all()):
        obs, mask = out.obs.reshape(n * A, -1), out.avail.reshape(n * A, -1)
        if baseline is not None:
            actions = BASELINES[baseline](sim, generator=gen)
        else:
            if h is not None:  # a recurrent actor's hidden state, zeroed at episode starts
                h = h * (~out.done).repeat_interleave(A).unsqueeze(1).to(h.dtype)
            actions, h = policy_actions(policy, obs, mask, unit, greedy_t, gen, h)
            actions = actions.reshape(n, A)
        out = sim.step(actions)
        first = out.done & ~finished
        for k in EVAL_STATS:
            result[k] = torch.where(first, getattr(out, k).to(torch.float32), result[k])
        finished |= out.done
    return result


# --- the learner ------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    summary: dict
    policy: Policy
    history: list[dict] = field(default_factory=list)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_group_backend(device: str) -> str:
    """gloo on CPU; on GPU nccl for CUDA tensors (the gradients) and gloo beside it for the few small CPU
    tensors the ranks agree on (start-up, the lr/stop decision): an nccl-only group refuses CPU tensors."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def setup_distributed(device: str) -> tuple[int, int, str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU.
    Returns (rank, world_size, device), the device pinned to LOCAL_RANK on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(device))
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def all_ranks_ready(ready: bool) -> bool:
    """Whether every rank got through its own start-up (say rank 0 binding --metrics-port). Every rank calls it
    at the same point, so a rank that failed alone does not leave the others waiting in a collective it will
    never join (gloo would wait out its 30-minute timeout). Without torchrun: `ready` itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return ready
    flag = torch.tensor([1 if ready else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def leave_process_group(exit_code: int) -> NoReturn:
    """End a torchrun rank: wait for the others, leave the process group, and exit with `exit_code` without the
    interpreter's shutdown.

    Why not a normal exit: a gloo worker thread can still be releasing the last collectives (the barrier keeps
    the broadcast before it alive, and that holds a tensor Python made), which takes the GIL. If the interpreter
    is already shutting down, taking the GIL ends the thread mid-destructor and the process aborts (SIGABRT,
    about one run in thirty on 2 cores). destroy_process_group does not join those threads. Everything a run
    writes is closed before this is called; standard streams are flushed here."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


class GracefulStop:
    """SIGINT (Ctrl-C) or SIGTERM (`docker stop`, a scheduler) while training: finish the iteration, evaluate and
    save a last version as at the end of the budget, then return; a signal more than `repeat_after` seconds later
    quits at once (KeyboardInterrupt). Sooner is the same stop delivered twice: SLURM's scancel signals every
    process of a job and torchrun passes its own signal on to its ranks as well. Installed only in the main
    thread (signals reach no other), and undone on exit. Under torchrun a signal to any rank stops them all."""

    def __init__(self, repeat_after: float = 1.0,
                 plan: str = "stopping after this iteration with a last evaluation and version"):
        self.signal: int | None = None
        self.repeat_after, self.plan = repeat_after, plan
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            if time.monotonic() - self._first > self.repeat_after:
                raise KeyboardInterrupt
            return
        self.signal, self._first = signum, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: {self.plan} (again to quit at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(cfg: TrainConfig, *, metrics=None) -> TrainResult:
    """Run PPO as configured; returns the summary (also the CLI's final JSON line), the policy and the curve.
    `metrics` is a `trainer.train_metrics.TrainMetrics` (or None): updated every iteration, pushed at evals.
    A first SIGINT or SIGTERM ends the run early but whole (GracefulStop); summary["stop_reason"] says why it
    ended: budget, target, or the signal's name."""
    with GracefulStop() as graceful, contextlib.ExitStack() as held:
        return _train(cfg, metrics, graceful, held)


def _train(cfg: TrainConfig, metrics, graceful: GracefulStop, held: contextlib.ExitStack) -> TrainResult:
    """`train`'s body; `held` closes what the run holds (its claim on the name) however the run ends."""
    (rank, world), device = _dist_info(), cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for, but torch sees no CUDA device")
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sc = load_scenario(cfg.scenario, files=cfg.scenario_files)
    repo = ModelRepository(cfg.models)
    minutes = cfg.minutes if (cfg.minutes is not None or cfg.steps is not None) else 10.0
    torch.manual_seed(cfg.seed)

    # --- the policy: fresh, or resumed from a stored version -----------------------------------------------
    start_step, resumed_from = 0, None
    if cfg.resume is not None:
        version = repo.latest(cfg.name) if cfg.resume == "latest" else int(cfg.resume)
        if version is None:
            raise TrainError(f"--resume latest: model {cfg.name!r} has no version under {cfg.models}")
        loaded = repo.load(cfg.name, version)
        mismatch = loaded.spec_mismatch(sc)
        if mismatch:
            raise TrainError(f"--resume: {mismatch}")
        stored = {k: loaded.policy.config[k] for k in ARCHITECTURE_FIELDS}
        clash = [f"{k}={getattr(cfg, k)!r} (stored: {stored[k]!r})" for k in ARCHITECTURE_FIELDS
                 if getattr(cfg, k) != stored[k]]
        if clash:  # the stored network is what trains: never let the config claim another one
            raise TrainError(f"--resume: version {version} of {cfg.name!r} keeps its architecture; this run asks "
                             f"for {', '.join(clash)}")
        policy, start_step, resumed_from = loaded.policy, int(loaded.card["step"]), version
    else:
        policy = Policy.for_scenario(sc, sharing=cfg.sharing, critic=cfg.critic, hidden=cfg.hidden,
                                     agent_id=cfg.agent_id, unit_type=cfg.unit_type, recurrent=cfg.recurrent)
    policy = policy.to(device).train()
    model: nn.Module = policy
    if world > 1:
        # buffers (the value normaliser) stay in step because every rank folds in the same all-reduced moments
        model = nn.parallel.DistributedDataParallel(policy, forward_sync_buffers=False,
                                                    find_unused_parameters=policy.n_groups > 1)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    if resumed_from is not None:
        unrestored = _resume_adam(repo, cfg.name, resumed_from, optimizer, policy)
        if world > 1 and not all_ranks_ready(unrestored is None) and unrestored is None:
            optimizer.state.clear()  # another rank could not restore it: the ranks' updates must stay the same
            unrestored = "another rank could not read the stored optimizer state"
        if unrestored and rank == 0:
            print(f"train: note: Adam starts afresh: {unrestored}", file=sys.stderr)
    if rank or start_step:
        # every rank built the same network from one seed; its action noise must be its own, or rank 1 would
        # repeat rank 0's choices in its own games (and a resumed run the original run's first choices)
        torch.manual_seed(cfg.seed + 1_000_003 * rank + start_step)

    # --- sizes and storage ------------------------------------------------------------------------------
    E, T, A = cfg.envs, cfg.rollout, sc.n_agents
    O, S, N, H = sc.obs_size, sc.state_size, sc.n_actions, policy.hidden
    central = policy.critic == "central"
    # each rank its own games; a resumed run new ones too (not the original run's openings again)
    sim = BattleSim(sc, E, seed=cfg.seed + 1_000_000 * (rank + 1) + start_step, device=device, check_actions=False)
    dev = sim.device
    unit_flat = torch.arange(A, device=dev).repeat(E)  # (E*A,) slot of each row
    steps_per_iter = E * T * world
    eval_every = cfg.eval_every or None  # None: by time (about every 20 s)
    budget_steps = cfg.steps

    b_obs = torch.zeros(T, E, A, O, device=dev)
    b_mask = torch.zeros(T, E, A, N, dtype=torch.bool, device=dev)
    b_alive = torch.zeros(T, E, A, dtype=torch.bool, device=dev)
    b_actions = torch.zeros(T, E, A, dtype=torch.int64, device=dev)
    b_logprob = torch.zeros(T, E, A, device=dev)
    b_state = torch.zeros(T, E, S, device=dev)
    b_values = torch.zeros((T, E) if central else (T, E, A), device=dev)  # normalised critic outputs
    b_reward = torch.zeros(T, E, device=dev)
    b_done = torch.zeros(T, E, dtype=torch.bool, device=dev)
    b_start = torch.zeros(T, E, dtype=torch.bool, device=dev)

    # --- logging (rank 0) -------------------------------------------------------------------------------
    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(cfg.models) / cfg.name / "logs"
    csv_path = log_dir / f"{cfg.name}-{cfg.scenario}.csv"
    history: list[dict] = []  # this run's evaluations
    # A resumed run continues the stored run's curve (its rows up to the version resumed from), in steps, samples
    # and minutes (the card's, which count from the first run); a log it does not continue is moved aside.
    lineage = [c["version"] for c in repo.lineage(cfg.name, loaded.card)] if resumed_from is not None else []
    prior, stale_log = _continued_rows(csv_path, lineage) if rank == 0 else ([], False)
    card = loaded.card if resumed_from is not None else {}
    # a version made from shards records no simulator samples or minutes: the curve's own last row does
    samples_before = int(card.get("samples") or (prior[-1]["samples"] if prior else 0))
    minutes_before = float(card.get("minutes") or (prior[-1]["minutes"] if prior else 0.0))
    bar, setup_error = None, None
    if rank == 0:
        try:
            held.enter_context(prepare_outputs(repo, cfg.name, log_dir, sc))
        except TrainError as e:
            setup_error = e
    # every rank learns whether rank 0 could claim the name and write there: a rank left alone in a collective
    # would wait out gloo's 30-minute timeout
    if world > 1 and not all_ranks_ready(setup_error is None) and setup_error is None:
        raise TrainError(f"rank {rank} stops: rank 0 could not start (see its error)")
    if setup_error is not None:
        raise setup_error
    if rank == 0:
        if cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=budget_steps, unit="step", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                       desc=f"train {sc.name}", mininterval=1.0)

    out = sim.reset()
    h = torch.zeros(E * A, H, device=dev) if policy.recurrent else None
    starts = torch.ones(E, dtype=torch.bool, device=dev)
    global_step, samples = start_step, 0
    t0 = time.perf_counter()
    last_eval_step, last_eval_time = global_step, t0
    best_win, last_eval, version, stop_reason = None, None, resumed_from, "budget"
    ep_wins, ep_returns, ep_count = 0.0, 0.0, 0
    iter_stats: dict[str, float] = {}
    stop_next = False  # rank 0's decision, taken right after an evaluation so the last version is always saved
    failure: Exception | None = None  # rank 0's error in its logging, evaluation or save (under torchrun)

    def budget_fraction() -> float:
        frac = 0.0
        if budget_steps:
            frac = max(frac, (global_step - start_step) / budget_steps)
        if minutes:
            frac = max(frac, (time.perf_counter() - t0) / (60 * minutes))
        return frac

    while True:
        # --- agree on lr and stopping (rank 0 decides: its clock and its evaluation) ----------------------
        # (rank 0's budget clock, rank 0's stop, the signal any rank was sent): a rank told to stop tells them all
        control = torch.tensor([budget_fraction(), float(stop_next), float(graceful.signal or 0)],
                               dtype=torch.float64)
        if world > 1:
            dist.all_reduce(control, op=dist.ReduceOp.MAX)
        frac, stop, signalled = float(control[0]), bool(control[1]), int(control[2]) or graceful.signal
        if stop:
            break
        lr = cfg.lr * max(1.0 - frac, 0.0) if cfg.anneal_lr else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        ent_coef = cfg.ent_coef if cfg.ent_coef_final is None else \
            cfg.ent_coef + (cfg.ent_coef_final - cfg.ent_coef) * min(frac, 1.0)
        h0 = h.clone() if h is not None else None

        # --- 1. collect: every unit of every game acts on its own observation -------------------------------
        policy.eval()
        with torch.no_grad():
            for t in range(T):
                b_obs[t], b_mask[t], b_alive[t], b_state[t], b_start[t] = out.obs, out.avail, out.alive, out.state, starts
                if h is not None:
                    h = h * (~starts).repeat_interleave(A).unsqueeze(1).to(h.dtype)
                logits, h = policy.actor_step(out.obs.reshape(E * A, O), out.avail.reshape(E * A, N), unit_flat, h)
                log_probs = torch.log_softmax(logits, 1)
                gumbel = -torch.log(-torch.log(torch.rand_like(log_probs).clamp(min=1e-20)))
                action = (log_probs + gumbel).argmax(1)  # a sample from the masked softmax
                b_actions[t] = action.reshape(E, A)
                b_logprob[t] = log_probs.gather(1, action[:, None]).reshape(E, A)
                b_values[t] = policy.value(out.state) if central else policy.value(
                    out.obs.reshape(E * A, O), unit_flat).reshape(E, A)
                out = sim.step(b_actions[t])
                b_reward[t], b_done[t] = out.reward, out.done
                starts = out.done
                if bool(out.done.any()):
                    d = out.done
                    ep_wins += float(out.won[d].sum())
                    ep_returns += float(out.episode_return[d].sum())
                    ep_count += int(d.sum())
            next_value = policy.value(out.state) if central else policy.value(
                out.obs.reshape(E * A, O), unit_flat).reshape(E, A)
        policy.train()

        # --- 2. advantages: GAE on denormalised values; targets re-normalised with updated statistics ---------
        with torch.no_grad():
            values = policy.value_norm.denormalize(b_values)
            next_v = policy.value_norm.denormalize(next_value)
            advantages = team_gae(b_reward, values, next_v, b_done, cfg.gamma, cfg.gae_lambda)
            returns = advantages + values
            moments = torch.stack([returns.mean(), (returns ** 2).mean()]).double()
            if world > 1:
                dist.all_reduce(moments)
                moments /= world
            policy.value_norm.update_moments(float(moments[0]), float(moments[1]))
            b_returns_n = policy.value_norm.normalize(returns)
            unit_adv = advantages[:, :, None].expand(T, E, A) if central else advantages
            live_adv = unit_adv[b_alive]
            if live_adv.numel() > 1:  # normalised over live samples (one sample has no spread to divide by)
                unit_adv = (unit_adv - live_adv.mean()) / (live_adv.std() + 1e-8)

        # --- 3. update: K epochs of M minibatches over the pooled live-unit samples -----------------------
        M = cfg.minibatches
        if policy.recurrent:  # sequences of whole rollouts per unit; minibatches split the units
            seq = dict(obs=b_obs.reshape(T, E * A, O), mask=b_mask.reshape(T, E * A, N),
                       active=b_alive.reshape(T, E * A), actions=b_actions.reshape(T, E * A),
                       old_log_prob=b_logprob.reshape(T, E * A), advantages=unit_adv.reshape(T, E * A),
                       starts=b_start.repeat_interleave(A, dim=1))
            n_actor = E * A
        else:  # flat rows; dead units' samples are dropped (masked out of the loss)
            live = select_actor_rows(b_alive, cfg.actor_rows).reshape(-1)
            rows = dict(obs=b_obs.reshape(-1, O)[live], mask=b_mask.reshape(-1, N)[live],
                        unit=unit_flat.repeat(T)[live], actions=b_actions.reshape(-1)[live],
                        old_log_prob=b_logprob.reshape(-1)[live], advantages=unit_adv.reshape(-1)[live])
            rows["active"] = torch.ones_like(rows["actions"], dtype=torch.bool)
            n_actor = rows["actions"].shape[0]
        # the critic learns on every game step (central) or every unit's step, dead units' included (local).
        # Its clip anchor is the network's output while collecting, as in MAPPO's reference code: the clip bounds
        # how far the output moves in one update, while the targets are in the statistics just updated.
        if central:
            crit = dict(critic_in=b_state.reshape(-1, S), returns=b_returns_n.reshape(-1),
                        old_values=b_values.reshape(-1))
        else:
            crit = dict(critic_in=b_obs.reshape(-1, O), critic_unit=unit_flat.repeat(T),
                        returns=b_returns_n.reshape(-1), old_values=b_values.reshape(-1))
        n_critic = crit["returns"].shape[0]
        stat_sums: dict[str, float] = {}
        for epoch in range(cfg.epochs):
            actor_perm = torch.randperm(n_actor, device=dev)
            critic_perm = torch.randperm(n_critic, device=dev)
            for m in range(M):
                a_idx = actor_perm[m * n_actor // M:(m + 1) * n_actor // M]
                if policy.recurrent:
                    mb = {k: v[:, a_idx] for k, v in seq.items()}
                    mb["unit"], mb["h0"] = unit_flat[a_idx], h0[a_idx]
                else:
                    mb = {k: v[a_idx] for k, v in rows.items()}
                c_idx = critic_perm[m * n_critic // M:(m + 1) * n_critic // M]
                mb.update({k: v[c_idx] for k, v in crit.items()})
                loss, stats = ppo_loss(model, mb, clip_coef=cfg.clip_coef, vf_coef=cfg.vf_coef,
                                       ent_coef=ent_coef, clip_vloss=cfg.clip_vloss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                for k, v in stats.items():
                    stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
        n_updates = cfg.epochs * M
        iter_stats = {k: v / n_updates for k, v in stat_sums.items()}
        if not weights_finite(policy):
            # stop before a broken network becomes a version (the repository would refuse to load it anyway)
            raise TrainError(f"training diverged at step {global_step + steps_per_iter:,}: the network's weights "
                             f"are no longer finite (losses {iter_stats}); nothing was saved from this update on"
                             + (f", version {version} is the last good one" if version else "")
                             + "; a lower --lr or --max-grad-norm may help")
        global_step += steps_per_iter
        samples += int(b_alive.sum()) * world

        # --- 4. log --------------------------------------------------------------------------------------------
        if rank != 0:
            continue
        try:  # rank 0 alone: a failure here must still reach the others through the next stop decision
            elapsed = time.perf_counter() - t0
            agent_steps_per_s = (global_step - start_step) * A / max(elapsed, 1e-9)
            train_win = ep_wins / ep_count if ep_count else None
            train_ret = ep_returns / ep_count if ep_count else None
            if metrics is not None:
                metrics.update_iteration(steps=global_step, samples=samples, agent_steps_per_s=agent_steps_per_s,
                                         train_win_rate=train_win, train_return=train_ret, lr=lr, **iter_stats)
            def show_progress(refresh: bool) -> None:
                bar.set_postfix_str(
                    f"agent-steps/s {agent_steps_per_s:,.0f} | win {'-' if train_win is None else f'{train_win:.2f}'}"
                    f" | ret {'-' if train_ret is None else f'{train_ret:.1f}'}"
                    f" | eval {'-' if last_eval is None else f'{last_eval:.2f}'}"
                    # a budget in minutes gives the bar no total (and so no time left) of its own
                    + (f" | {max(minutes - elapsed / 60, 0):.1f} min left" if minutes and not budget_steps else ""),
                    refresh=refresh)

            if bar is not None:
                bar.update(steps_per_iter)
                show_progress(refresh=False)

            # --- 5. evaluate and save ----------------------------------------------------------------------------
            due = (global_step - last_eval_step >= eval_every) if eval_every else (time.perf_counter() - last_eval_time >= 20)
            budget_done = budget_fraction() >= 1.0
            signalled = signalled or graceful.signal  # this rank's own, if it came during this iteration
            over = budget_done or bool(signalled)
            if due or over:
                ev = evaluate(policy, sc, cfg.eval_episodes, cfg.seed, device=dev)
                last_eval, last_eval_step, last_eval_time = ev["win_rate"], global_step, time.perf_counter()
                best_win = ev["win_rate"] if best_win is None else max(best_win, ev["win_rate"])
                version = _save(repo, cfg.name, policy, scenario=sc, step=global_step, eval_win_rate=ev["win_rate"],
                                    extra={"eval_episodes": cfg.eval_episodes, "eval_seed": cfg.seed,
                                           "eval_mean_return": ev["mean_return"], "samples": samples_before + samples,
                                           "minutes": round(minutes_before + elapsed / 60, 4), "resumed_from": resumed_from,
                                           "training": {**training_settings(cfg), "world_size": world}},
                                    optimizer_state=adam_state(optimizer, policy))
                row = {"steps": global_step, "minutes": round(minutes_before + elapsed / 60, 4),
                       "samples": samples_before + samples,
                       "win_rate": ev["win_rate"], "return": round(ev["mean_return"], 4),
                       "train_win_rate": None if train_win is None else round(train_win, 4),
                       "train_return": None if train_ret is None else round(train_ret, 4),
                       **{k: round(v, 6) for k, v in iter_stats.items()}, "lr": lr, "ent_coef": ent_coef,
                       "agent_steps_per_s": round(agent_steps_per_s, 1), "version": version}
                history.append(row)
                if stale_log:  # only now that this run has rows of its own to write
                    _move_aside(csv_path, "this run does not continue all of it")
                    stale_log = False
                _write_csv(csv_path, prior + history)
                reached = target_held(history, cfg.target_win_rate, cfg.target_window)
                ep_wins, ep_returns, ep_count = 0.0, 0.0, 0
                if metrics is not None:
                    metrics.update_eval(win_rate=ev["win_rate"], mean_return=ev["mean_return"], version=version)
                    metrics.push()
                line = (f"step {global_step:,}  {elapsed / 60:5.2f} min  eval win rate {ev['win_rate']:.3f}  "
                        f"return {ev['mean_return']:.2f}  -> version {version}")
                if bar is not None:
                    bar.write(line, file=sys.stderr)
                    show_progress(refresh=True)  # the bar's eval is this one (the last stays on screen)
                else:
                    print(line, file=sys.stderr, flush=True)
                if reached:
                    stop_reason = "target"
                elif signalled and not budget_done:  # a signal during the budget's last evaluation changes nothing
                    stop_reason = signal.Signals(int(signalled)).name
                stop_next = over or reached
        except Exception as e:  # noqa: BLE001 - re-raised below, once every rank has left the loop
            if world == 1:
                raise
            failure, stop_next = e, True

    if failure is not None:  # every rank is out of the loop: rank 0's own error (a failed save, ...) goes up now
        raise failure
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    summary = {}
    if rank == 0:
        _plot(prior + history, log_dir / f"{cfg.name}-{cfg.scenario}.png", title=f"{cfg.name} on {sc.name}")
        start_win = card.get("eval_win_rate") if resumed_from is not None else None
        comparable = (card.get("eval_episodes"), card.get("eval_seed")) == (cfg.eval_episodes, cfg.seed)
        if start_win is not None and last_eval is not None and comparable and last_eval < start_win:
            # a short resume restarts the schedules (learning rate, entropy bonus) and can end below where it began
            best = max(history, key=lambda r: r["win_rate"]) if history else None
            print(f"train: warning: the last version ({version}) evaluates below version {resumed_from}, which this "
                  f"run resumed from, on the same {cfg.eval_episodes} games: win rate {last_eval:.3f} (was "
                  f"{start_win:.3f}); this run's best was {best['win_rate']:.3f} (version {best['version']}). A "
                  f"service following {cfg.name!r} serves the newest version unless given --min-eval-win-rate",
                  file=sys.stderr, flush=True)
        summary = {"scenario": sc.name, "name": cfg.name, "sharing": policy.sharing, "critic": policy.critic,
                   # steps and samples count from the first run of a resumed lineage, as the card and CSV do;
                   # run_* and minutes are this run's own
                   "steps": global_step, "samples": samples_before + samples, "run_steps": global_step - start_step,
                   "run_samples": samples, "minutes": round(elapsed / 60, 3),
                   "final_eval_win_rate": last_eval, "best_eval_win_rate": best_win,
                   "target_win_rate": cfg.target_win_rate, "reached_target": stop_reason == "target",
                   "stop_reason": stop_reason,
                   "version": version, "world_size": world,
                   "agent_steps_per_s": round((global_step - start_step) * A / max(elapsed, 1e-9), 1),
                   "csv": str(csv_path), "plot": str(log_dir / f"{cfg.name}-{cfg.scenario}.png")}
    return TrainResult(summary, policy, history)


def weights_finite(policy: Policy) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in policy.state_dict().values() if t.is_floating_point())


def prepare_outputs(repo: ModelRepository, name: str, log_dir: Path, scenario):
    """Make sure versions and logs can be written before a run spends its budget, and claim the name: returns
    the open lock file (ModelRepository.claim), to keep open (a `with`) until the run's last write. Refuses a
    name whose versions were trained on another observation/action spec than `scenario`'s."""
    try:
        claim = repo.claim(name)
    except OSError as e:
        raise TrainError(str(e)) from None
    try:
        other_spec = _other_spec(repo, name, scenario)
        if other_spec:
            raise TrainError(other_spec)
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainError(f"cannot write logs under {log_dir}: {e.strerror or e}") from None
    except BaseException:
        claim.close()
        raise
    return claim


def _other_spec(repo: ModelRepository, name: str, scenario) -> str | None:
    """Why `name` cannot take a version for `scenario`: its newest version was trained on another spec, and a
    service following the name would switch its games to an observation layout they do not send. None if it
    can (no version yet, the same spec, or a newest card that cannot be read: loading reports that one)."""
    try:
        card, version, _ = repo.load_card(name)
    except ModelLoadError:
        return None
    spec = card["spec"]
    if spec["hash"] == scenario.spec_hash:
        return None
    return (f"model {name!r} under {repo.root} holds versions trained on spec {spec['name']!r} (newest: version "
            f"{version}, hash {spec['hash']}), and this run trains scenario {scenario.name!r} (hash "
            f"{scenario.spec_hash}): a service following {name!r} would switch to a model its games cannot talk "
            f"to. Train under another --name (or, if those versions are no longer wanted, delete "
            f"{repo.root / name} by hand)")


ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def adam_state(optimizer: torch.optim.Adam, policy: Policy) -> dict[str, torch.Tensor]:
    """A copy of Adam's state of each parameter, named after it (`actor_in.weight.exp_avg`, `.exp_avg_sq`,
    `.step`): names rather than the optimizer's own positions, so a reader can tell whose moment is whose."""
    out = {}
    for name, p in policy.named_parameters():
        state = optimizer.state.get(p)
        if state:  # a parameter that never had a gradient has no state yet
            for key in ADAM_KEYS:
                out[f"{name}.{key}"] = torch.as_tensor(state[key], dtype=torch.float32).detach().to("cpu", copy=True)
    return out


def restore_adam_state(optimizer: torch.optim.Adam, policy: Policy, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Give a fresh Adam the stored state of every parameter, if all of it fits: for each parameter all three
    tensors, its shape, finite, second moments >= 0, a whole step count >= 1, and nothing for parameters the
    network lacks. Returns what does not fit; then nothing is restored (half a run's state is no run's state)."""
    params = dict(policy.named_parameters())
    unfit = [f"{name} (not the network's)" for name in sorted({key.rsplit(".", 1)[0] for key in tensors} - set(params))]
    for name, p in params.items():
        got = {key: tensors.get(f"{name}.{key}") for key in ADAM_KEYS}
        if any(v is None for v in got.values()):
            unfit.append(f"{name} (not stored)")
        elif got["exp_avg"].shape != p.shape or got["exp_avg_sq"].shape != p.shape or got["step"].numel() != 1:
            unfit.append(f"{name} (stored shape {tuple(got['exp_avg'].shape)}, the network's {tuple(p.shape)})")
        elif (not all(bool(torch.isfinite(v).all()) for v in got.values()) or bool((got["exp_avg_sq"] < 0).any())
              or float(got["step"]) < 1 or float(got["step"]) != int(float(got["step"]))):
            unfit.append(f"{name} (values out of range)")
    if unfit:
        return unfit
    for name, p in params.items():
        optimizer.state[p] = {"step": torch.tensor(float(tensors[f"{name}.step"]), dtype=torch.float32),
                              "exp_avg": tensors[f"{name}.exp_avg"].to(p.device, p.dtype, copy=True),
                              "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(p.device, p.dtype, copy=True)}
    return []


def _resume_adam(repo: ModelRepository, name: str, version: int, optimizer: torch.optim.Adam,
                 policy: Policy) -> str | None:
    """Continue the stored run's Adam, its moments and step counts (fresh ones make a resumed run's first
    updates as large as a new run's). None when restored, else why Adam starts afresh."""
    try:
        tensors = repo.load_optimizer_state(name, version)
    except ModelLoadError as e:
        return str(e)
    if tensors is None:
        return f"version {version} stores no optimizer state (written offline, or by an older Phalanx)"
    unfit = restore_adam_state(optimizer, policy, tensors)
    return f"version {version}'s optimizer state does not fit: {', '.join(unfit)}"[:600] if unfit else None


def _save(repo: ModelRepository, name: str, policy: Policy, **kw) -> int:
    """repo.save, with a full disk or a vanished directory reported as what it is rather than a traceback."""
    try:
        return repo.save(name, policy, **kw)
    except OSError as e:
        raise TrainError(f"could not save a version of {name!r} under {repo.root}: {e}") from None


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))  # every column, in order of appearance
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _prior_rows(path: Path) -> list[dict]:
    """Every row of an earlier run's CSV, which this run's rows follow. A file that cannot be read is moved
    aside, never overwritten."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as e:
        _move_aside(path, f"cannot continue this log ({e})")
        return []


def _continued_rows(path: Path, lineage: list[int]) -> tuple[list[dict], bool]:
    """The rows of the CSV that a run continues: those up to the row of the newest version of its lineage that
    has one (a version made from shards has none; later rows belong to a continuation it replaces). A fresh
    run continues none. -> (rows, whether the file holds more: it is then moved aside before this run first
    writes, so that a new run under an old name never erases a curve)."""
    rows = _prior_rows(path)
    for version in lineage:
        ends = [i for i, r in enumerate(rows) if r.get("version") == str(version)]
        if ends:
            kept = rows[:ends[-1] + 1]
            return kept, len(kept) < len(rows)
    return [], bool(rows)


def _move_aside(path: Path, why: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = next(a for a in (path.with_name(f"{path.name}.{stamp}" + (f"-{i}" if i else "")) for i in range(1000))
                 if not a.exists())
    os.replace(path, aside)
    logging.getLogger(__name__).warning("%s: %s; moved it to %s", path, why, aside)


def _plot(history: list[dict], path: Path, *, title: str) -> None:
    """Win rate and return against steps and against minutes (2 x 2 panels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for col, x_key, x_label in ((0, "steps", "environment steps"), (1, "minutes", "wall-clock minutes")):
        xs = [float(r[x_key]) for r in history]  # rows continued from a CSV hold strings
        axes[0, col].plot(xs, [float(r["win_rate"]) for r in history], marker=".")
        axes[0, col].set(xlabel=x_label, ylabel="greedy win rate", ylim=(-0.02, 1.02))
        axes[1, col].plot(xs, [float(r["return"]) for r in history], marker=".", color="tab:orange")
        axes[1, col].set(xlabel=x_label, ylabel="greedy mean return")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)
