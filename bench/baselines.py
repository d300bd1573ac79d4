"""Win rate of each scripted baseline on each scenario, over many games (default 1,000).

    python bench/baselines.py                       # every built-in scenario, 1,000 games each
    python bench/baselines.py --scenarios 3m,8m --games 200

The same games as `phalanx eval --policy NAME --episodes N --seed S`: N games at once (game i plays with
seed S+i), the first episode of each counted.
Ends with one JSON line: {"win_rate": {scenario: {policy: rate}}, ...}.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainer.ppo import evaluate  # noqa: E402  (what `phalanx eval --policy NAME` runs)
from trainer.sim import load_catalogue  # noqa: E402
from trainer.sim.baselines import BASELINES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="", help="comma-separated (default: all built-in)")
    p.add_argument("--games", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    catalogue = load_catalogue()
    names = args.scenarios.split(",") if args.scenarios else list(catalogue)
    table: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    print(f"{'scenario':<14}" + "".join(f"{n:>16}" for n in BASELINES))
    for name in names:
        table[name] = {}
        cells = []
        for pname in BASELINES:
            r = evaluate(None, catalogue[name], args.games, args.seed, baseline=pname)
            table[name][pname] = round(r["win_rate"], 4)
            cells.append(f"{r['win_rate']:>7.1%} ({r['mean_return']:4.1f})")
        print(f"{name:<14}" + "".join(f"{c:>16}" for c in cells))
    print("(win rate, mean return in parentheses)")
    print(json.dumps({"bench": "baselines", "games": args.games, "seed": args.seed, "win_rate": table,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
