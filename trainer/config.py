"""What a training run is asked to do: `phalanx train`'s options, checked once, before anything heavy loads.

TrainConfig (online PPO, trainer/ppo.py) and OfflineConfig (learning from logged experience, trainer/offline.py)
live here, apart from the code that runs them, because they import nothing but the standard library: the CLI
builds its --help from their defaults, and `phalanx health` (a container's probe every few seconds) and
`phalanx scenarios` should not pay for importing torch to do so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

SHARING_MODES = ("shared", "per-type", "independent")
CRITICS = ("central", "local")

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str) -> str:
    """Model names are one safe path component: letters, digits, '_', '.', '-' (not leading '.' or '-')."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"model name must match {_NAME_RE.pattern} (a single safe path component), got {name!r}")
    return name


class TrainError(ValueError):
    """A training option or input broke a rule; the message names it."""


ACTOR_ROWS = ("all", "one-unit", "game-subset")


def _enforce(rules: list[tuple[bool, str]], name: str) -> None:
    """Raise TrainError with the message of the first rule that does not hold, then check the model name."""
    for ok, message in rules:
        if not ok:
            raise TrainError(message)
    try:
        check_name(name)
    except ValueError as e:
        raise TrainError(f"--name: {e}") from None


@dataclass
class TrainConfig:
    """Everything one `phalanx train` run needs, parsed once at the CLI edge."""

    models: str
    """Model repository root; versions go to <models>/<name>/<version>/."""
    name: str
    """Model name inside the repository."""
    scenario: str = "3m"
    """Scenario to train on (see `phalanx scenarios`)."""
    scenario_files: tuple[str, ...] = ()
    """Extra TOML scenario files."""
    sharing: str = "shared"
    """Parameter sharing: shared (one network), per-type (one per unit type), independent (one per slot)."""
    critic: str = "central"
    """central: MAPPO critic on the global state, one value per game; local: IPPO critic on each unit's obs."""
    hidden: int = 64
    """Width of every hidden layer."""
    agent_id: bool = True
    """Append the unit slot's one-hot to the actor's (and a local critic's) input. On by default: one shared
    network can then give slots different roles, and it learns faster (with a constant bonus 0.05: 3m 95% in
    2.7 min, where without it the policy plateaus at 90-93%; 8m and 2s3z in half the time). It needs the
    annealed entropy bonus below: with a constant 0.05, 5m_vs_6m stalls near 40% (bench/RESULTS.md)."""
    unit_type: bool = False
    """Append the unit type's one-hot to the actor's input."""
    recurrent: bool = False
    """Put a GRU core in the actor (training only: the service cannot serve recurrent policies)."""
    envs: int = 512
    """Games played at once per rank."""
    rollout: int = 8
    """Steps per game per iteration (T)."""
    steps: int | None = None
    """Budget in environment steps (game steps summed over all games and ranks)."""
    minutes: float | None = None
    """Budget in wall-clock minutes (default 10 when neither budget is given)."""
    target_win_rate: float | None = None
    """Stop as soon as a greedy evaluation reaches this win rate (see target_window)."""
    target_window: int = 1
    """Stop when the mean of the last this-many evaluations reaches target_win_rate. 1: the first evaluation
    that does; more asks the policy to stay there (a greedy policy can swing by tens of points between
    neighbouring checkpoints, so one evaluation above the target can be luck)."""
    seed: int = 0
    """Seed of the network init and of the evaluation games; training games use other seeds per rank."""
    device: str = "cpu"
    """cpu or cuda (cuda:N)."""
    threads: int = 1
    """torch CPU threads (0: torch's default). 1 is fastest for these small networks, and far faster when
    the cores are shared: OpenMP threads that wait on busy cores spin and stall every op."""
    lr: float = 5e-4
    """Adam learning rate at the start; annealed linearly to 0 over the budget when anneal_lr."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly over the budget (steps or minutes)."""
    gamma: float = 0.99
    """Discount."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    epochs: int = 10
    """Passes over each rollout (K)."""
    minibatches: int = 2
    """Minibatches per epoch (M)."""
    clip_coef: float = 0.2
    """PPO ratio clip."""
    clip_vloss: bool = True
    """Clip the value update around the old prediction (in normalised units)."""
    ent_coef: float = 0.1
    """Entropy bonus at the start of the budget. High on purpose: the simulator is nearly deterministic, and
    with a small bonus the policy turns deterministic early and stalls (3m: 40-80% with 0.01; 5m_vs_6m: near
    40% with a constant 0.05 and the agent id)."""
    ent_coef_final: float | None = 0.02
    """The entropy bonus at the end of the budget, reached linearly like the learning rate's anneal, so the
    greedy policy sharpens as training ends. None keeps ent_coef constant. 0.1 -> 0.02 is the one setting
    measured to train every scenario of bench/RESULTS.md without a stall (a constant 0.05 was faster on
    3m-3s5z and MMM2 but stalled 5m_vs_6m)."""
    vf_coef: float = 0.5
    """Value loss weight."""
    max_grad_norm: float = 10.0
    """Global gradient-norm clip."""
    eval_every: int = 0
    """Evaluate (and save a version) every this many environment steps; 0: auto (about every 20 s)."""
    eval_episodes: int = 256
    """Greedy evaluation games (the first episode of each)."""
    resume: str | None = None
    """A version of <name> to continue from: an integer or 'latest'."""
    log_dir: str | None = None
    """Where the CSV curve and PNG plot go (default: <models>/<name>/logs)."""
    metrics_port: int | None = None
    """Serve Prometheus /metrics on this port while training (0: any free port)."""
    metrics_addr: str = "127.0.0.1"
    """Address the metrics endpoint binds."""
    pushgateway: str | None = None
    """Prometheus Pushgateway URL: metrics are pushed at each evaluation and at the end."""
    progress: bool = True
    """Show a tqdm progress bar on stderr (without it, one line per evaluation is printed there)."""
    actor_rows: str = "all"
    """Which live units' samples train the actor: all (the pooled update); one-unit (one live unit per game step,
    at random); game-subset (every live unit of a random share of the game steps, as many samples as one-unit).
    The critic trains on every step either way, and advantages are normalised over every live unit's. A probe
    for bench/sharing.py, not a training option: it asks whether sharing's gain comes from more units per game
    step or from more game steps. Not exposed by `phalanx train`."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check = [
            (self.sharing in SHARING_MODES, f"--sharing must be one of {', '.join(SHARING_MODES)}, got {self.sharing!r}"),
            (self.critic in CRITICS, f"--critic must be one of {', '.join(CRITICS)}, got {self.critic!r}"),
            (self.hidden >= 1, f"--hidden must be >= 1, got {self.hidden}"),
            (self.envs >= 1, f"--envs must be >= 1, got {self.envs}"),
            (self.rollout >= 1, f"--rollout must be >= 1, got {self.rollout}"),
            (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.minutes is None or self.minutes > 0, f"--minutes must be > 0, got {self.minutes}"),
            (self.target_win_rate is None or 0 < self.target_win_rate <= 1,
             f"--target-win-rate must lie in (0, 1], got {self.target_win_rate}"),
            (self.target_window >= 1, f"--target-window must be >= 1, got {self.target_window}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.gamma <= 1, f"--gamma must lie in [0, 1], got {self.gamma}"),
            (0 <= self.gae_lambda <= 1, f"--gae-lambda must lie in [0, 1], got {self.gae_lambda}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.minibatches >= 1, f"--minibatches must be >= 1, got {self.minibatches}"),
            (self.clip_coef > 0, f"--clip-coef must be > 0, got {self.clip_coef}"),
            (self.ent_coef >= 0, f"--ent-coef must be >= 0, got {self.ent_coef}"),
            (self.ent_coef_final is None or self.ent_coef_final >= 0,
             f"--ent-coef-final must be >= 0, got {self.ent_coef_final}"),
            (self.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {self.max_grad_norm}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}"),
            (self.eval_episodes >= 1, f"--eval-episodes must be >= 1, got {self.eval_episodes}"),
            (self.threads >= 0, f"--threads must be >= 0, got {self.threads}"),
            (self.metrics_port is None or 0 <= self.metrics_port <= 65535,
             f"--metrics-port must lie in 0..65535, got {self.metrics_port}"),
            (self.resume is None or self.resume == "latest" or (self.resume.isdigit() and int(self.resume) > 0),
             f"--resume must be a positive version number or 'latest', got {self.resume!r}"),
            (self.device == "cpu" or self.device.startswith("cuda"), f"--device must be cpu or cuda[:N], got {self.device!r}"),
            (self.actor_rows in ACTOR_ROWS, f"actor_rows must be one of {', '.join(ACTOR_ROWS)}, got {self.actor_rows!r}"),
            (self.actor_rows == "all" or not self.recurrent, "actor_rows other than 'all' needs a feed-forward actor"),
        ]
        _enforce(check, self.name)


# The TrainConfig fields that shape the network: a resumed version keeps its own (the CLI fills them from it).
ARCHITECTURE_FIELDS = ("sharing", "critic", "hidden", "agent_id", "unit_type", "recurrent")

# What `phalanx train --critic local` uses unless told otherwise. A local critic sees one unit's view, so values
# bootstrapped from it mislead: with 8-step rollouts and lambda 0.95 it never won an 8m game in 2M steps. Whole
# games per rollout (8m's limit is 120 steps) with lambda 1.0 leave it only as the baseline of the real returns:
# 8m 82.8% after 5 minutes (bench/RESULTS.md).
LOCAL_CRITIC_DEFAULTS = {"envs": 64, "rollout": 128, "gae_lambda": 1.0}


@dataclass
class OfflineConfig:
    """One `phalanx train --from-shards` run, parsed once at the CLI edge."""

    shards: tuple[str, ...]
    """Shard directories or files (written by `phalanx serve --experience-dir`)."""
    models: str
    """Model repository root; the new version goes to <models>/<name>/<version>/."""
    name: str
    """Model name inside the repository."""
    scenario: str | None = None
    """Scenario whose spec the shards must carry, and where the result is evaluated; None: the shards' spec."""
    scenario_files: tuple[str, ...] = ()
    """Extra TOML scenario files."""
    sharing: str = "shared"
    """Parameter sharing of a fresh policy (a resumed one keeps its own)."""
    hidden: int = 64
    """Hidden width of a fresh policy."""
    agent_id: bool = True
    """A fresh policy appends the unit slot's one-hot to its input (as `phalanx train` does by default)."""
    unit_type: bool = False
    """A fresh policy appends the unit type's one-hot to its input."""
    resume: str | None = None
    """A version of <name> to continue from: an integer or 'latest'."""
    iterations: int = 3
    """V-trace target recomputations (I); each is followed by `epochs` x `minibatches` updates. Few on purpose:
    every one moves the policy further from the one that logged the data, and on a trained 3m policy's log ten
    made it far worse where two or three kept it (bench/RESULTS.md)."""
    critic_warmup: int = 5
    """Iterations, before those, in which only a fresh critic learns (a new policy's, or the local critic a
    central-critic version gets here). A critic's random values make the first advantages noise, and their
    normalisation would turn that noise into full-size steps of the actor."""
    epochs: int = 10
    """Passes over the logged samples per iteration (K)."""
    minibatches: int = 2
    """Minibatches per epoch (M)."""
    lr: float = 5e-4
    """Adam learning rate at the start; annealed linearly to 0 over the iterations when anneal_lr."""
    anneal_lr: bool = True
    """Anneal the learning rate over the iterations."""
    gamma: float = 0.99
    """Discount."""
    lam: float = 0.95
    """V-trace lambda (the trace weight c is lambda * min(c_bar, ratio)), like GAE's lambda."""
    rho_bar: float = 1.0
    """Truncation of the importance weight in the TD errors and advantages (IMPALA's rho-bar)."""
    c_bar: float = 1.0
    """Truncation of the trace weights (IMPALA's c-bar)."""
    clip_coef: float = 0.2
    """PPO clip of the ratio against the iteration's starting policy (and of the value update)."""
    ent_coef: float = 0.05
    """Entropy bonus, constant (there is no budget to anneal over here; TrainConfig.ent_coef above says why a
    high bonus matters on this simulator)."""
    vf_coef: float = 0.5
    """Value loss weight."""
    max_grad_norm: float = 10.0
    """Global gradient-norm clip."""
    eval_episodes: int = 256
    """Greedy evaluation games on the simulator after training (the first episode of each)."""
    seed: int = 0
    """Seed of the network init, the minibatch order and the evaluation games."""
    device: str = "cpu"
    """cpu or cuda[:N]."""
    threads: int = 1
    """torch CPU threads (0: torch's default)."""
    log_dir: str | None = None
    """Where the per-iteration CSV goes (default: <models>/<name>/logs)."""
    progress: bool = True
    """One line per iteration on stderr."""

    def __post_init__(self):
        check = [
            (len(self.shards) >= 1, "--from-shards needs at least one directory or file"),
            (self.sharing in SHARING_MODES, f"--sharing must be one of {', '.join(SHARING_MODES)}, got {self.sharing!r}"),
            (self.hidden >= 1, f"--hidden must be >= 1, got {self.hidden}"),
            (self.iterations >= 1, f"--iterations must be >= 1, got {self.iterations}"),
            (self.critic_warmup >= 0, f"--critic-warmup must be >= 0, got {self.critic_warmup}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.minibatches >= 1, f"--minibatches must be >= 1, got {self.minibatches}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.gamma <= 1, f"--gamma must lie in [0, 1], got {self.gamma}"),
            (0 <= self.lam <= 1, f"--gae-lambda must lie in [0, 1], got {self.lam}"),
            (self.rho_bar > 0, f"--rho-bar must be > 0, got {self.rho_bar}"),
            (self.c_bar > 0, f"--c-bar must be > 0, got {self.c_bar}"),
            (self.clip_coef > 0, f"--clip-coef must be > 0, got {self.clip_coef}"),
            (self.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {self.max_grad_norm}"),
            (self.eval_episodes >= 1, f"--eval-episodes must be >= 1, got {self.eval_episodes}"),
            (self.threads >= 0, f"--threads must be >= 0, got {self.threads}"),
            (self.resume is None or self.resume == "latest" or (self.resume.isdigit() and int(self.resume) > 0),
             f"--resume must be a positive version number or 'latest', got {self.resume!r}"),
            (self.device == "cpu" or self.device.startswith("cuda"), f"--device must be cpu or cuda[:N], got {self.device!r}"),
        ]
        _enforce(check, self.name)


# Where a run wrote or reported things, and paths on the machine that trained: not how the model was learned.
_NOT_SETTINGS = {"models", "name", "shards", "scenario_files", "resume", "log_dir", "progress", "metrics_port",
                 "metrics_addr", "pushgateway", "threads"}


def training_settings(cfg: TrainConfig | OfflineConfig) -> dict:
    """The settings that decided how a version was learned (learning rate, games per rollout, entropy bonus,
    seed, budget, ...), as plain JSON for its card: a served model says how it was trained, and benchmark runs
    can be checked to differ only where they should."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _NOT_SETTINGS}
