"""`phalanx train` and `phalanx eval`: flags parsed once into a config dataclass, then handed to the learner.

Both commands end with one JSON line on stdout. Bad flag values, unknown scenarios and bad model files exit
with status 2 and a message on stderr that names the problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from dataclasses import dataclass

from trainer.sim.scenario import ScenarioError

BASELINE_NAMES = ("random", "attack-nearest", "focus-fire")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (the help text says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == [] or "(default" in (action.help or ""):
            return action.help  # no default, an empty list (a repeatable flag), or one the help text gives
        return super()._get_help_string(action)


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.config import LOCAL_CRITIC_DEFAULTS, OfflineConfig, TrainConfig

    d = TrainConfig(models=".", name="x")  # the defaults, shown in --help
    p = sub.add_parser("train", help="learn the shared unit policy with PPO and publish versions to a model repository",
                       description="PPO over the pooled experience of every unit (MAPPO with a central critic, or "
                                   "IPPO with a local one). Evaluates greedily every so often, saves a version at "
                                   "each evaluation and at the end, writes a CSV curve and a PNG plot, and prints "
                                   "one JSON line. Under `torchrun --nproc-per-node K` it trains with "
                                   "DistributedDataParallel (gloo on CPU, nccl on GPU).",
                       formatter_class=_Help)
    p.add_argument("--models", required=True, help="model repository root")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--scenario", help=f"scenario name (see `phalanx scenarios`); default {d.scenario}, with "
                                      "--from-shards the shards' spec")
    p.add_argument("--scenario-file", action="append", default=[], metavar="FILE",
                   help="a TOML file of extra units and scenarios (repeatable)")
    p.add_argument("--sharing", choices=("shared", "per-type", "independent"),
                   help=f"parameter sharing mode (default {d.sharing}; with --resume the stored version's)")
    p.add_argument("--critic", choices=("central", "local"),
                   help=f"central: MAPPO critic on the global state; local: IPPO critic on each unit's observation "
                        f"(default {d.critic}; with --resume the stored version's; --from-shards: always local)")
    p.add_argument("--hidden", type=int, help=f"hidden layer width (default {d.hidden}; with --resume the stored "
                                              "version's)")
    p.add_argument("--agent-id", action=argparse.BooleanOptionalAction,
                   help=f"append the unit slot's one-hot to the input (default {d.agent_id}; with a constant "
                        "--ent-coef 0.05 it stalled 5m_vs_6m near 40%%; the default entropy anneal does not: "
                        "bench/RESULTS.md)")
    p.add_argument("--unit-type", action="store_true", default=None,
                   help="append the unit type's one-hot to the input")
    p.add_argument("--recurrent", action="store_true", default=None,
                   help="GRU core in the actor (cannot be served)")
    p.add_argument("--envs", type=int, help=f"games played at once (per rank); default {d.envs}, "
                                            f"{LOCAL_CRITIC_DEFAULTS['envs']} with --critic local")
    p.add_argument("--rollout", type=int, help=f"steps per game per iteration; default {d.rollout}, "
                                               f"{LOCAL_CRITIC_DEFAULTS['rollout']} with --critic local")
    p.add_argument("--steps", type=int, help="budget in environment steps (with --minutes as well: whichever "
                                             "runs out first ends the run)")
    p.add_argument("--minutes", type=float, help="budget in wall-clock minutes (10 when no budget is given)")
    p.add_argument("--target-win-rate", type=float, help="stop when a greedy evaluation reaches this win rate")
    p.add_argument("--target-window", type=int, metavar="K",
                   help=f"with --target-win-rate: stop when the mean of the last K evaluations reaches it (default "
                        f"{d.target_window}: the first evaluation that does; more guards against a lucky checkpoint)")
    p.add_argument("--seed", type=int, help=f"seed (network init, games){_kept(d, 'seed')}")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    p.add_argument("--lr", type=float, help=f"learning rate at the start{_kept(d, 'lr')}")
    p.add_argument("--anneal-lr", action=argparse.BooleanOptionalAction,
                   help=f"anneal the learning rate linearly to 0 over the budget{_kept(d, 'anneal_lr')}")
    p.add_argument("--gamma", type=float, help=f"discount{_kept(d, 'gamma')}")
    p.add_argument("--gae-lambda", type=float, help=f"GAE lambda; default {d.gae_lambda}, "
                                                    f"{LOCAL_CRITIC_DEFAULTS['gae_lambda']} with --critic local")
    p.add_argument("--epochs", type=int, help=f"epochs per rollout{_kept(d, 'epochs')}")
    p.add_argument("--minibatches", type=int, help=f"minibatches per epoch{_kept(d, 'minibatches')}")
    p.add_argument("--clip-coef", type=float, help=f"PPO clip{_kept(d, 'clip_coef')}")
    p.add_argument("--ent-coef", type=float,
                   help=f"entropy bonus at the start (default {d.ent_coef}; --from-shards: a constant "
                        f"{OfflineConfig.ent_coef})")
    p.add_argument("--ent-coef-final", type=float,
                   help=f"entropy bonus at the end of the budget, reached linearly like the learning rate's anneal "
                        f"(default {d.ent_coef_final}; give --ent-coef's value for a constant bonus)")
    p.add_argument("--vf-coef", type=float, help=f"value loss weight{_kept(d, 'vf_coef')}")
    p.add_argument("--max-grad-norm", type=float, help=f"gradient norm clip{_kept(d, 'max_grad_norm')}")
    p.add_argument("--eval-every", type=int,
                   help=f"evaluate and save every N environment steps, 0: about every 20 s{_kept(d, 'eval_every')}")
    p.add_argument("--eval-episodes", type=int, help=f"greedy evaluation games{_kept(d, 'eval_episodes')}")
    p.add_argument("--resume", help="continue from a version of --name: a number or 'latest'. The network keeps "
                                    "its architecture (--sharing, --critic, --hidden, --agent-id, --unit-type, "
                                    "--recurrent come from it and may only repeat it). In simulation training, "
                                    "--scenario and the learning settings default to the stored run's, the budget "
                                    "is this run's own, the schedules (learning rate, entropy bonus) run again "
                                    "over it, Adam continues from the moments stored with the version, and the "
                                    "CSV log continues. From shards, Adam starts afresh")
    p.add_argument("--log-dir", help="CSV and PNG directory (default <models>/<name>/logs)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: any free port)")
    p.add_argument("--metrics-host", "--metrics-addr", dest="metrics_addr", metavar="HOST",
                   help=f"with --metrics-port: the interface to listen on, as `serve --metrics-host` (default "
                        f"{d.metrics_addr})")
    p.add_argument("--pushgateway", help="Prometheus Pushgateway URL, pushed at each evaluation and at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("offline training (learn from experience logged by `phalanx serve --experience-dir`)")
    g.add_argument("--from-shards", action="append", default=[], metavar="DIR",
                   help="learn from these shard directories or files instead of simulation (repeatable): PPO with "
                        "V-trace off-policy correction, then a greedy evaluation and a new version")
    g.add_argument("--iterations", type=int,
                   help=f"V-trace target recomputations, each followed by --epochs x --minibatches updates "
                        f"(default {OfflineConfig.iterations})")
    g.add_argument("--critic-warmup", type=int,
                   help=f"iterations, before --iterations, in which only a fresh critic learns (a central-critic "
                        f"version gets a new local critic here; default {OfflineConfig.critic_warmup})")
    g.add_argument("--rho-bar", type=float, help=f"V-trace importance-weight clip (default {OfflineConfig.rho_bar})")
    g.add_argument("--c-bar", type=float, help=f"V-trace trace-weight clip (default {OfflineConfig.c_bar})")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="win rate of a stored model (or a scripted baseline) over many games",
                       description="Play --episodes games at once (BattleSim with --seed) and count the first "
                                   "episode of each; greedy unless --sample. `phalanx play --games N --seed S` "
                                   "against the service reproduces the greedy games action for action.",
                       formatter_class=_Help)
    p.add_argument("--models", help="model repository root")
    p.add_argument("--name", help="model name in the repository")
    p.add_argument("--version", type=int, help="model version (default: the newest)")
    p.add_argument("--scenario", help="scenario name (default: the one the model was trained on, from its card; "
                                      "required with --policy)")
    p.add_argument("--scenario-file", action="append", default=[], metavar="FILE",
                   help="a TOML file of extra units and scenarios (repeatable)")
    p.add_argument("--episodes", type=int, default=256, help="games (the first episode of each; many are played "
                                                             "in batches of bounded memory, with progress on stderr)")
    p.add_argument("--seed", type=int, help="game seed: game i uses seed + i (default 0); with --env sc2 the real "
                                            "game's seed, re-applied to every episode (default: none, a new game "
                                            "each episode)")
    p.add_argument("--sample", action="store_true", help="sample actions instead of taking the argmax")
    p.add_argument("--policy", choices=BASELINE_NAMES, help="evaluate this scripted baseline instead of a model")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the built-in simulator only)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    add_game_flags(p, "its episodes one after another")
    p.set_defaults(func=cmd_eval)


def _kept(defaults, field: str) -> str:
    """Help text for a learning setting: its default, and what --resume does with it."""
    return f" (default {getattr(defaults, field)}; with --resume, simulation training takes the stored run's)"


# pysc2's Difficulty names (listed here so that --help needs no pysc2)
SC2_DIFFICULTIES = ("very_easy", "easy", "medium", "medium_hard", "hard", "harder", "very_hard", "cheat_vision",
                    "cheat_money", "cheat_insane")


def add_game_flags(p: argparse.ArgumentParser, episodes: str) -> None:
    """--env, --sc2-map, --sc2-difficulty: where `phalanx eval` and `phalanx play` play their games."""
    p.add_argument("--env", choices=("sim", "sc2"), default="sim",
                   help="sim: the built-in simulator, all games at once (default); sc2: real StarCraft II through "
                        f"pysc2 (the `sc2` extra, the game and SMAC's maps installed), {episodes} against the "
                        "built-in bot")
    p.add_argument("--sc2-map", help="with --env sc2: the SMAC map to load (default: the scenario's name)")
    p.add_argument("--sc2-difficulty", default="very_hard", choices=SC2_DIFFICULTIES, metavar="LEVEL",
                   help="with --env sc2: the built-in bot's difficulty, one of " + ", ".join(SC2_DIFFICULTIES)
                        + " (default very_hard, SMAC's level 7)")


def game_flag_error(args) -> str | None:
    """The game flags' one rule: --sc2-* only with --env sc2."""
    if args.env != "sc2" and (args.sc2_map is not None or args.sc2_difficulty != "very_hard"):
        return "--sc2-map and --sc2-difficulty apply to --env sc2"
    return None


def scenario_to_play(scenario: str | None, models: str | None, name: str | None, version: int | None,
                     files: list[str], *, baseline: bool) -> str | None:
    """The scenario eval and replay play: --scenario, else the one the model's card records. Raises ValueError
    (no scenario to go by) or ModelLoadError (the card cannot be read)."""
    if scenario is not None:
        return scenario
    if baseline:
        raise ValueError("--scenario is needed to play a scripted policy (a model's card names its own)")
    if not models or not name:
        return None  # no model named either: the caller's own check says what to give
    from trainer.repository import ModelRepository
    from trainer.sim import load_catalogue

    card, version, _ = ModelRepository(models).load_card(name, version)
    recorded = str(card["scenario"])
    try:
        known = recorded in load_catalogue(files)
    except ScenarioError:
        known = True  # the files' own error is load_scenario's to report
    if not known:
        raise ValueError(f"version {version} of {name!r} was trained on scenario {recorded!r}, which is not built "
                         f"in: pass the --scenario-file that defines it")
    return recorded


def _fail(command: str, message: str) -> int:
    print(f"phalanx {command}: {message}", file=sys.stderr)
    return 2


# --- train ----------------------------------------------------------------------------------------------------

def stored_card(args) -> dict | None:
    """The card of the version --resume names, or None for a fresh run (or a malformed --resume, which the
    config refuses with its own message)."""
    if args.resume is None or not (args.resume == "latest" or args.resume.isdigit()):
        return None
    from trainer.config import TrainError
    from trainer.repository import ModelLoadError, ModelRepository  # torch: only for a resumed run

    try:
        card, _, _ = ModelRepository(args.models).load_card(
            args.name, None if args.resume == "latest" else int(args.resume))
    except ModelLoadError as e:
        raise TrainError(f"--resume {args.resume}: {e}") from None
    return card


def architecture_from_args(args, defaults, card: dict | None) -> dict:
    """The network's switches (ARCHITECTURE_FIELDS). Flags parse as None when not given: a fresh network takes
    `defaults`' values (a TrainConfig or OfflineConfig), a resumed one (`card`) its stored version's; an explicit
    flag that contradicts the stored version is refused (a trained network cannot change shape)."""
    from trainer.config import ARCHITECTURE_FIELDS, TrainError

    fields = [k for k in ARCHITECTURE_FIELDS if hasattr(defaults, k)]
    given = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    if card is None:
        return {k: given.get(k, getattr(defaults, k)) for k in fields}
    stored = {k: card["architecture"].get(k, getattr(defaults, k)) for k in fields}
    clash = [f"--{k.replace('_', '-')} {given[k]} (stored: {stored[k]})" for k in fields
             if k in given and given[k] != stored[k]]
    if clash:
        raise TrainError(f"--resume: version {card['version']} of {args.name!r} keeps its architecture; this run "
                         f"asks for {', '.join(clash)}. Leave those flags out, or train a new --name")
    return stored


# `phalanx train` flags that parse as None when not given, so that their value can come from elsewhere: the local
# critic's defaults, or the stored run on --resume (RESUMED_SETTINGS).
_OPTIONAL_FLAGS = ("scenario", "envs", "rollout", "seed", "lr", "anneal_lr", "gamma", "gae_lambda", "epochs",
                   "minibatches", "clip_coef", "ent_coef", "ent_coef_final", "vf_coef", "max_grad_norm", "eval_every",
                   "eval_episodes", "target_window", "metrics_addr")
# What a resumed run takes from the stored one unless a flag says otherwise. Not its budget or stopping rule (this
# run's own), nor the device and threads (this machine's).
RESUMED_SETTINGS = tuple(k for k in _OPTIONAL_FLAGS if k not in ("target_window", "metrics_addr"))


def simulation_settings(args, card: dict) -> dict:
    """The learning settings of the last simulation run in a version's lineage. A version made from shards
    records offline settings (a constant bonus, V-trace iterations): follow `resumed_from` back to the run that
    learned in the simulator. {} when there is none, or the card predates the record."""
    from trainer.repository import ModelRepository

    simulated = next((c for c in ModelRepository(args.models).lineage(args.name, card) if "offline" not in c), {})
    return simulated.get("training") or {}


def train_config_from_args(args) -> "TrainConfig":
    from trainer.config import LOCAL_CRITIC_DEFAULTS, TrainConfig, TrainError

    offline_only = [f for f, v in (("--iterations", args.iterations), ("--critic-warmup", args.critic_warmup),
                                   ("--rho-bar", args.rho_bar), ("--c-bar", args.c_bar)) if v is not None]
    if offline_only:
        raise TrainError(f"{', '.join(offline_only)} applies to --from-shards (offline) training only")
    if args.target_window is not None and args.target_win_rate is None:
        raise TrainError("--target-window needs --target-win-rate (the win rate its evaluations must reach)")
    if args.metrics_addr is not None and args.metrics_port is None:
        raise TrainError("--metrics-host needs --metrics-port (nothing is served without it)")
    card = stored_card(args)
    arch = architecture_from_args(args, TrainConfig, card)
    settings = {k: getattr(TrainConfig, k) for k in _OPTIONAL_FLAGS}
    if arch["critic"] == "local":
        settings.update(LOCAL_CRITIC_DEFAULTS)
    if card is not None:
        stored = simulation_settings(args, card)
        if stored.get("critic", arch["critic"]) != arch["critic"]:
            # a central-critic run's rollouts do not suit the local critic its version got offline
            stored = {k: v for k, v in stored.items() if k not in LOCAL_CRITIC_DEFAULTS}
        settings.update({k: stored[k] for k in RESUMED_SETTINGS if k in stored}, scenario=card["scenario"])
    settings.update({k: getattr(args, k) for k in _OPTIONAL_FLAGS if getattr(args, k) is not None})
    return TrainConfig(
        models=args.models, name=args.name, scenario_files=tuple(args.scenario_file), **arch, steps=args.steps,
        minutes=args.minutes, target_win_rate=args.target_win_rate, device=args.device, threads=args.threads,
        resume=args.resume, log_dir=args.log_dir, metrics_port=args.metrics_port, pushgateway=args.pushgateway,
        progress=not args.no_progress, **settings)


def offline_config_from_args(args) -> "OfflineConfig":
    from trainer.config import OfflineConfig, TrainError

    online_only = [flag for flag, given in (
        ("--critic central", args.critic == "central"), ("--recurrent", args.recurrent), ("--steps", args.steps),
        ("--envs", args.envs is not None), ("--rollout", args.rollout is not None),
        ("--minutes", args.minutes), ("--target-win-rate", args.target_win_rate),
        ("--target-window", args.target_window), ("--eval-every", args.eval_every is not None),
        ("--metrics-port", args.metrics_port), ("--metrics-host", args.metrics_addr),
        ("--ent-coef-final", args.ent_coef_final is not None)) if given]
    if online_only:
        raise TrainError(f"--from-shards learns from logged single unit-steps with a local critic and no "
                         f"environment; {', '.join(online_only)} applies to simulation training only")
    flags = {"lam": "gae_lambda"}  # OfflineConfig fields whose flag has another name
    given = {field: getattr(args, flags.get(field, field)) for field in (
        "iterations", "critic_warmup", "epochs", "minibatches", "lr", "anneal_lr", "gamma", "lam", "rho_bar", "c_bar",
        "clip_coef", "ent_coef", "vf_coef", "max_grad_norm", "eval_episodes", "seed")
        if getattr(args, flags.get(field, field)) is not None}
    return OfflineConfig(
        shards=tuple(args.from_shards), models=args.models, name=args.name, scenario=args.scenario,
        scenario_files=tuple(args.scenario_file), **architecture_from_args(args, OfflineConfig, stored_card(args)),
        resume=args.resume, device=args.device, threads=args.threads, log_dir=args.log_dir,
        progress=not args.no_progress, **given)


def _exit_status(summary: dict) -> int:
    """A run stopped by a signal was saved and reported, but it is not the run that was asked for: a shell sees
    128 + the signal, as usual."""
    stopped_by = summary.get("stop_reason", "")
    return 128 + signal.Signals[stopped_by].value if stopped_by.startswith("SIG") else 0


def cmd_train_offline(args) -> int:
    from trainer.config import TrainError
    from trainer.offline import StoppedBeforeLearning, train_offline
    from trainer.repository import ModelLoadError
    from trainer.shards import ShardError
    from trainer.train_metrics import TrainMetrics

    import os

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _fail("train", f"--from-shards runs in one process; launch it without torchrun "
                              f"(WORLD_SIZE={os.environ['WORLD_SIZE']})")
    try:
        cfg = offline_config_from_args(args)
        if cfg.scenario is not None:
            from trainer.sim import load_scenario
            load_scenario(cfg.scenario, files=cfg.scenario_files)
    except (TrainError, ScenarioError) as e:
        return _fail("train", str(e))
    metrics = None
    if args.pushgateway:
        metrics = TrainMetrics(scenario=cfg.scenario or "from-shards", model=cfg.name, pushgateway=args.pushgateway)
    try:
        result = train_offline(cfg, metrics=metrics)
    except StoppedBeforeLearning as e:
        print(f"phalanx train: {e}", file=sys.stderr)
        return 128 + e.signum
    except (TrainError, ScenarioError, ModelLoadError, ShardError) as e:
        return _fail("train", str(e))
    if metrics is not None:
        metrics.push()
    print(json.dumps(result.summary))
    return _exit_status(result.summary)


def cmd_train(args) -> int:
    if args.from_shards:
        return cmd_train_offline(args)

    from trainer.config import TrainError
    from trainer.sim import load_scenario

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = train_config_from_args(args)
        load_scenario(cfg.scenario, files=cfg.scenario_files)  # an unknown scenario fails before anything starts
    except (TrainError, ScenarioError) as e:
        return _fail("train", str(e))
    from trainer.ppo import leave_process_group, setup_distributed  # torch: only once the flags are good
    rank, world, cfg.device = setup_distributed(cfg.device)
    # An exception propagates without waiting for the other ranks: they fail on their next collective.
    code = _train_rank(cfg, rank)
    if world > 1:
        leave_process_group(code)  # rank 0 may still be plotting: leave together; does not return
    return code


def _train_rank(cfg, rank: int) -> int:
    """This process's share of `phalanx train` (all of it without torchrun); rank 0 alone serves metrics and
    prints the summary."""
    from trainer.config import TrainError
    from trainer.ppo import all_ranks_ready, train
    from trainer.repository import ModelLoadError
    from trainer.train_metrics import TrainMetrics

    metrics, failed = None, None
    try:
        if rank == 0 and (cfg.metrics_port is not None or cfg.pushgateway):
            metrics = TrainMetrics(scenario=cfg.scenario, model=cfg.name, pushgateway=cfg.pushgateway)
            if cfg.metrics_port is not None:
                try:
                    port = metrics.serve(cfg.metrics_port, cfg.metrics_addr)
                    print(f"metrics on http://{cfg.metrics_addr}:{port}/metrics", file=sys.stderr)
                except OSError as e:
                    failed = (f"--metrics-port {cfg.metrics_port}: cannot listen on "
                              f"{cfg.metrics_addr}:{cfg.metrics_port}: {e}")
        if not all_ranks_ready(failed is None):
            return _fail("train", failed or f"rank {rank} stops: another rank could not start (see its error)")
        try:
            result = train(cfg, metrics=metrics)
        except (TrainError, ScenarioError, ModelLoadError) as e:
            return _fail("train", str(e))
        if metrics is not None:
            metrics.push()
        if rank == 0:
            print(json.dumps(result.summary))
        return _exit_status(result.summary)
    finally:
        if metrics is not None:
            metrics.close()


# --- eval -----------------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """One `phalanx eval` run, parsed once from the flags."""

    scenario: str
    """Scenario to play."""
    episodes: int = 256
    """Games played at once; the first episode of each counts."""
    seed: int = 0
    """Game i uses seed + i (and sampling uses a generator seeded with seed)."""
    greedy: bool = True
    """Argmax actions (False: sample)."""
    baseline: str | None = None
    """A scripted baseline to evaluate instead of a model."""
    models: str | None = None
    """Model repository root (for a model)."""
    name: str | None = None
    """Model name (for a model)."""
    version: int | None = None
    """Model version (None: the newest)."""
    scenario_files: tuple[str, ...] = ()
    """Extra TOML scenario files."""
    device: str = "cpu"
    """cpu or cuda[:N]."""
    threads: int = 1
    """torch CPU threads (0: torch's default)."""

    def __post_init__(self):
        if self.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {self.episodes}")
        if self.baseline is None and (not self.models or not self.name):
            raise ValueError("give --models and --name to evaluate a model, or --policy for a scripted baseline")
        if self.baseline is not None and self.baseline not in BASELINE_NAMES:
            raise ValueError(f"--policy must be one of {', '.join(BASELINE_NAMES)}, got {self.baseline!r}")
        if self.version is not None and self.version < 1:
            raise ValueError(f"--version must be a positive integer, got {self.version}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device must be cpu or cuda[:N], got {self.device!r}")


def cmd_eval(args) -> int:
    import torch

    from trainer.ppo import evaluate
    from trainer.repository import ModelLoadError, ModelRepository
    from trainer.sim import load_scenario

    try:
        scenario = scenario_to_play(args.scenario, args.models, args.name, args.version, args.scenario_file,
                                    baseline=args.policy is not None)
        cfg = EvalConfig(scenario=scenario, episodes=args.episodes, seed=args.seed or 0, greedy=not args.sample,
                         baseline=args.policy, models=args.models, name=args.name, version=args.version,
                         scenario_files=tuple(args.scenario_file), device=args.device, threads=args.threads)
        sc = load_scenario(cfg.scenario, files=cfg.scenario_files)
    except (ValueError, ScenarioError, ModelLoadError) as e:
        return _fail("eval", str(e))
    in_game = args.env == "sc2"
    if in_game and cfg.device != "cpu":
        return _fail("eval", "--env sc2 plays one game at a time on the CPU: leave --device out")
    if (error := game_flag_error(args)) is not None:
        return _fail("eval", error)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        return _fail("eval", "--device cuda was asked for, but torch sees no CUDA device")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    head: dict = {"scenario": sc.name, "seed": args.seed if in_game else cfg.seed, "greedy": cfg.greedy}
    policy = None
    if cfg.baseline is not None:
        head["policy"] = cfg.baseline
    else:
        try:
            loaded = ModelRepository(cfg.models).load(cfg.name, cfg.version, device=cfg.device)
        except ModelLoadError as e:
            return _fail("eval", str(e))
        mismatch = loaded.spec_mismatch(sc)
        if mismatch:
            return _fail("eval", f"{mismatch}: refusing to evaluate it there")
        policy = loaded.policy
        head.update(policy="model", name=cfg.name, version=loaded.version)
    if in_game:
        try:
            from trainer.sc2.battle import evaluate_in_game
        except ImportError as e:
            return _fail("eval", f"--env sc2 needs pysc2-evolved (pip install -e '.[sc2]'): {e}")
        try:
            # pysc2 re-applies a fixed seed at every episode's new game: N greedy episodes would be one game N times
            result = evaluate_in_game(policy, sc, cfg.episodes, greedy=cfg.greedy, seed=args.seed,
                                      baseline=cfg.baseline, map_name=args.sc2_map, difficulty=args.sc2_difficulty)
        except (RuntimeError, ValueError, KeyError) as e:  # no game or map, a map unlike the scenario, a bad level
            return _fail("eval", f"--env sc2: {e}")
    else:
        def progress(done: int, totals: dict) -> None:  # between batches of games (long evaluations only)
            if done < cfg.episodes:
                print(f"eval: {done:,}/{cfg.episodes:,} games, win rate so far {totals['won'] / done:.3f}",
                      file=sys.stderr, flush=True)

        result = evaluate(policy, sc, cfg.episodes, cfg.seed, greedy=cfg.greedy, baseline=cfg.baseline,
                          device=cfg.device, progress=progress)
    print(json.dumps({**head, **result}))
    return 0
