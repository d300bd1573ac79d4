"""The trainer's subcommands of `phalanx`: scenarios, replay (here), train and eval (`trainer/commands.py`)."""

from __future__ import annotations

import argparse
import json
import sys

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
    table = [header] + [tuple(str(r[k]) for k in header) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
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
