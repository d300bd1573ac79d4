"""Wall-clock minutes to reach a greedy win rate, per scenario, with `phalanx train`'s defaults.

    python bench/train_time.py --scenario 3m --target 0.95 --minutes 5
    python bench/train_time.py --scenario 8m --target 0.95 --minutes 10
    python bench/train_time.py --scenario 2s3z,3s5z --target 0.90 --minutes 20
    python bench/train_time.py --scenario 5m_vs_6m,10m_vs_11m,MMM2 --minutes 30      # no target: best win rate

Each scenario trains from scratch (stopping at the target), then the final policy and the best scripted
baseline are evaluated on the same 1,000 greedy games. Ends with one JSON line:
{"results": {scenario: {minutes_to_target, steps_to_target, reached, best_eval_win_rate, final_win_rate_1000,
best_baseline, best_baseline_win_rate, beats_best_baseline, agent_steps_per_s}}, ...}.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench._overrides import parse_overrides  # noqa: E402
from trainer.ppo import TrainConfig, evaluate, train  # noqa: E402
from trainer.sim import load_scenario  # noqa: E402
from trainer.sim.baselines import BASELINES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="3m", help="comma-separated scenario names")
    ap.add_argument("--target", type=float, help="greedy win rate to reach (none: train the whole budget)")
    ap.add_argument("--minutes", type=float, default=5.0, help="budget per scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--games", type=int, default=1000, help="games of the final comparison with the baselines")
    ap.add_argument("--models", help="model repository (default: a temporary directory)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field, e.g. --set envs=256 --set lr=3e-4 (repeatable)")
    args = ap.parse_args()
    models = args.models or tempfile.mkdtemp(prefix="phalanx-bench-")
    overrides = parse_overrides(args.set)
    results = {}
    for name in [s for s in args.scenario.split(",") if s]:
        sc = load_scenario(name)
        cfg = TrainConfig(models=models, name=f"bench-{name}", scenario=name, minutes=args.minutes,
                          target_win_rate=args.target, seed=args.seed, **overrides)
        run = train(cfg)
        s, hist = run.summary, run.history
        hit = hist[-1] if s["reached_target"] else None  # the evaluation the run stopped at (see target_window)
        final = evaluate(run.policy, sc, args.games, args.seed + 7)
        base = {b: evaluate(None, sc, args.games, args.seed + 7, baseline=b)["win_rate"] for b in BASELINES}
        best_b = max(base, key=base.get)
        results[name] = {
            "minutes_to_target": hit["minutes"] if hit else None, "steps_to_target": hit["steps"] if hit else None,
            "reached": hit is not None, "minutes_trained": s["minutes"], "steps": s["steps"],
            "best_eval_win_rate": s["best_eval_win_rate"], "final_win_rate_1000": final["win_rate"],
            "best_baseline": best_b, "best_baseline_win_rate": base[best_b],
            "beats_best_baseline": final["win_rate"] > base[best_b], "agent_steps_per_s": s["agent_steps_per_s"],
            "csv": s["csv"]}
        r = results[name]
        print(f"{name:>12}: target {args.target} reached={r['reached']} in {r['minutes_to_target']} min "
              f"({r['steps_to_target']} steps); best eval {r['best_eval_win_rate']:.3f}; final {r['final_win_rate_1000']:.3f} "
              f"on {args.games} games vs {best_b} {base[best_b]:.3f}; {r['agent_steps_per_s']:,.0f} agent-steps/s",
              flush=True)
    print(json.dumps({"bench": "train_time", "target": args.target, "budget_minutes": args.minutes,
                      "results": results}))


if __name__ == "__main__":
    main()
