"""The trainer's subcommands of `phalanx`: scenarios, replay (here), train and eval (`trainer/commands.py`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.sim.scenario import ScenarioError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scenarios", help="list the simulator's scenarios and their observation/action sizes",
                       description="List every scenario (built-in, plus those in --scenario-file) with its units, "
                                   "agents, enemies, observation size, state size, action count and episode limit.")
    p.add_argument("--json", action="store_true", help="one JSON object per scenario, one per line")
    p.add_argument("--scenario-file", action="append", default=[], metavar="FILE",
                   help="a TOML file of extra units and scenarios (repeatable); see trainer/data/builtin.toml")
    p.set_defaults(func=cmd_scenarios)

    p = sub.add_parser("replay", help="play one episode and render it to an animated GIF or PNG frames",
                       description="Play one episode of a scenario with a scripted policy (or a trained model) "
                                   "and draw it: units as coloured circles with health bars, attacks as lines.")
    p.add_argument("--scenario", help="scenario name, e.g. 3m (see `phalanx scenarios`); with --policy model, "
                                      "default: the one the model was trained on")
    p.add_argument("--policy", default="focus-fire",
                   help="random | attack-nearest | focus-fire (default), or 'model' with --models/--name")
    p.add_argument("--models", help="model repository root (for --policy model)")
    p.add_argument("--name", help="model name in the repository (for --policy model)")
    p.add_argument("--version", type=int, help="model version (default: the newest)")
    p.add_argument("--seed", type=int, default=0, help="game seed (default 0)")
    p.add_argument("--out", required=True,
                   help="output: a .gif file, or a directory that receives frame_0000.png, frame_0001.png, ...")
    p.add_argument("--fps", type=float, default=6.0, help="frames per second of the GIF (default 6)")
    p.add_argument("--scenario-file", action="append", default=[], metavar="FILE",
                   help="a TOML file of extra units and scenarios (repeatable)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("models", help="list a model repository's models and versions; prune old versions",
                       description="Without --name: every model under --models, one line each (versions, the newest, "
                                   "the best by evaluation win rate, scenario, sharing). With --name: that model's "
                                   "versions (step, evaluation win rate, created, where it came from). With --prune: "
                                   "remove all but the newest --keep versions, the best one, any --keep-version and "
                                   "the versions those were resumed from; each is renamed away before it is deleted, "
                                   "so a service polling the name never sees half a version, and its number is "
                                   "never handed out again.")
    p.add_argument("--models", required=True, help="model repository root")
    p.add_argument("--name", help="one model's versions (default: every model, one line each)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table (a version "
                                                       "whose card cannot be read: only version and error); "
                                                       "--prune and --remove always end with one JSON line")
    p.add_argument("--prune", action="store_true", help="remove old versions of --name (see --keep)")
    p.add_argument("--keep", type=int, metavar="N", help="with --prune: the newest N versions stay (N >= 1)")
    p.add_argument("--keep-version", type=int, action="append", default=[], metavar="V",
                   help="with --prune: this version stays too (repeatable): one a service is pinned to, or serves "
                        "because newer ones are below its --min-eval-win-rate (responses and the "
                        "phalanx_model_version metric name it)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --prune or --remove: say what would be removed, remove nothing")
    p.add_argument("--remove", type=int, action="append", default=[], metavar="V",
                   help="remove version V of --name (repeatable): a rollback, since a service following the name "
                        "then serves the newest version left")
    p.set_defaults(func=cmd_models)

    from trainer import commands

    commands.register(sub)


def cmd_scenarios(args) -> int:
    from trainer.sim.scenario import load_catalogue

    try:
        catalogue = load_catalogue(args.scenario_file)
    except ScenarioError as e:
        print(f"phalanx scenarios: {e}", file=sys.stderr)
        return 2
    rows = [sc.summary() for sc in catalogue.values()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = ("name", "agents", "enemies", "n_agents", "n_enemies", "obs_size", "state_size", "n_actions",
              "episode_limit")
    _print_table(header, [tuple(str(r[k]) for k in header) for r in rows])
    return 0


def cmd_replay(args) -> int:
    from trainer.commands import scenario_to_play
    from trainer.repository import ModelLoadError
    from trainer.sim.replay import ReplayError, record_episode, save_replay

    try:
        args.scenario = scenario_to_play(args.scenario, args.models, args.name, args.version, args.scenario_file,
                                         baseline=args.policy != "model")
        if args.scenario is None:
            raise ReplayError("--policy model needs --models and --name")
        frames, result = record_episode(args.scenario, args.policy, seed=args.seed, files=args.scenario_file,
                                        models=args.models, name=args.name, version=args.version)
        written = save_replay(frames, args.out, fps=args.fps)
    except (ScenarioError, ReplayError, ModelLoadError, ValueError) as e:
        print(f"phalanx replay: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"scenario": args.scenario, "policy": args.policy, "seed": args.seed, **result,
                      "frames": len(frames), "out": written}))
    return 0


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _version_row(repo, name: str, version: int) -> dict:
    """What `phalanx models --name` shows of one version; an unreadable card says why instead."""
    from trainer.repository import ModelLoadError

    try:
        card = repo.load_card(name, version)[0]
    except ModelLoadError as e:
        return {"version": version, "error": str(e)}
    origin = "offline" if "offline" in card else "simulation"
    if card.get("resumed_from") is not None:
        origin += f", resumed from {card['resumed_from']}"
    return {"version": version, "step": card["step"], "eval_win_rate": card["eval_win_rate"],
            "created": card["created"], "scenario": card["scenario"], "sharing": card["sharing"], "critic": card["critic"],
            "spec_hash": card["spec"]["hash"], "origin": origin}


def _rate(rate) -> str:
    return "-" if rate is None else f"{rate:.3f}"


def cmd_models(args) -> int:
    import os

    from trainer.repository import ModelRepository, best_version

    def fail(message: str) -> int:
        print(f"phalanx models: {message}", file=sys.stderr)
        return 2

    if not Path(args.models).is_dir():
        what = "a file, not a model repository (a directory)" if Path(args.models).exists() else "no such directory"
        return fail(f"--models {args.models}: {what}")
    try:
        os.listdir(args.models)
    except OSError as e:
        return fail(f"--models {args.models}: cannot list it: {e.strerror or e}")
    if args.prune and args.remove:
        return fail("--prune and --remove are two ways to remove versions: use one at a time")
    if (args.keep is not None or args.keep_version) and not args.prune:
        return fail("--keep and --keep-version go with --prune")
    if args.dry_run and not (args.prune or args.remove):
        return fail("--dry-run goes with --prune or --remove")
    if args.prune and (args.name is None or args.keep is None):
        return fail("--prune needs --name (the model to prune) and --keep N (how many of the newest versions stay)")
    if args.remove and args.name is None:
        return fail("--remove needs --name (the model whose versions go)")
    repo = ModelRepository(args.models)
    held = repo.models()
    if args.name is not None and args.name not in held:
        return fail(f"no model {args.name!r} with complete versions under {args.models} (models there: "
                    f"{', '.join(held) or 'none'})")
    if args.prune or args.remove:
        return _prune(repo, args, fail)
    if args.name is not None:
        rows = [_version_row(repo, args.name, v) for v in held[args.name]]
        if args.json:
            for row in rows:
                print(json.dumps(row))
            return 0
        _print_table(("version", "step", "eval_win_rate", "created", "from"), [
            (str(r["version"]), "-", "-", "-", f"unreadable: {r['error']}") if "error" in r else
            (str(r["version"]), f"{r['step']:,}", _rate(r["eval_win_rate"]), r["created"], r["origin"]) for r in rows])
        return 0
    summaries = []
    for name, versions in held.items():
        rows = [_version_row(repo, name, v) for v in versions]
        readable = [r for r in rows if "error" not in r]
        rates = {r["version"]: r["eval_win_rate"] for r in readable}
        best = best_version(rates)
        newest = readable[-1] if readable else {}
        summaries.append({"name": name, "versions": len(versions), "latest": versions[-1], "best": best,
                          "best_eval_win_rate": None if best is None else rates[best],
                          "scenario": newest.get("scenario"), "sharing": newest.get("sharing"),
                          "critic": newest.get("critic"), "unreadable": len(rows) - len(readable)})
    if args.json:
        for summary in summaries:
            print(json.dumps(summary))
        return 0
    if not summaries:
        print(f"no model versions under {args.models}", file=sys.stderr)
        return 0
    _print_table(("name", "versions", "latest", "best (win rate)", "scenario", "sharing", "critic"), [
        (s["name"], str(s["versions"]) + (f" ({s['unreadable']} unreadable)" if s["unreadable"] else ""),
         str(s["latest"]), "-" if s["best"] is None else f"{s['best']} ({_rate(s['best_eval_win_rate'])})",
         s["scenario"] or "-", s["sharing"] or "-", s["critic"] or "-") for s in summaries])
    return 0


def _prune(repo, args, fail) -> int:
    """--prune (by the plan) or --remove (the versions named): each removed in turn, a line on stderr each, then
    one JSON line with what was removed and what is kept."""
    versions = repo.versions(args.name)
    extra = {}
    if args.remove:
        missing = sorted(set(args.remove) - set(versions))
        if missing:
            return fail(f"model {args.name!r} has no version {', '.join(map(str, missing))} to remove under "
                        f"{args.models} (complete versions: {versions})")
        doomed = sorted(set(args.remove))
        kept = [v for v in versions if v not in doomed]
        if not kept:
            return fail(f"that would remove every version of {args.name!r}: a service following it would have "
                        f"nothing to serve after a restart; keep one (or delete {Path(args.models) / args.name} "
                        f"by hand)")
    else:
        try:
            kept, doomed, best = repo.prune_plan(args.name, args.keep, tuple(args.keep_version))
        except ValueError as e:
            return fail(str(e))
        extra["best"] = best
    if not args.dry_run:
        for path in repo.sweep_removed(args.name):
            print(f"phalanx models: could not delete {path}, left by an earlier removal", file=sys.stderr)
    removed = []
    for version in doomed:
        if args.dry_run:
            print(f"would remove version {version}", file=sys.stderr)
        else:
            try:
                left = repo.remove(args.name, version)
            except FileNotFoundError:  # another prune, or a hand, got there first
                print(f"version {version}: already gone", file=sys.stderr)
                left = None
            except OSError as e:
                print(f"phalanx models: version {version}: {e}; stopping, version {version} and the rest are still "
                      f"there", file=sys.stderr)
                print(json.dumps({"name": args.name, "removed": removed, "kept": kept + doomed[len(removed):],
                                  **extra, "dry_run": False}))
                return 1
            print(f"removed version {version}" + (f" (could not delete all of {left}; it is no longer a version)"
                                                    if left else ""), file=sys.stderr)
        removed.append(version)
    print(json.dumps({"name": args.name, "removed": removed, "kept": kept, **extra, "dry_run": args.dry_run}))
    return 0
