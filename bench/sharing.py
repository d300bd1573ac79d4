"""The case for parameter sharing: shared vs per-type vs independent at equal samples.

    python bench/sharing.py --scenarios 8m,2s3z --steps 6000000 --target 0.9
    python bench/sharing.py --scenarios 3m --steps 200000 --out /tmp/sharing.png     # a quick check

Every mode trains for the same number of environment steps (so the same number of unit samples) with the
same seed and defaults; the greedy win rate is evaluated every --eval-every steps. Reports, per scenario and
mode, the samples and minutes at which the target was first reached, and draws every curve (win rate
against samples) into one PNG. Ends with one JSON line, including `independent_over_shared`: the ratio of
samples independent learners needed to those shared needed (the goal: >= 2).
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainer.ppo import TrainConfig, train  # noqa: E402

MODES = ("shared", "per-type", "independent")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="8m,2s3z")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=6_000_000, help="environment steps per run (equal for all modes)")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--eval-every", type=int, default=200_000)
    ap.add_argument("--eval-episodes", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sharing.png", help="PNG with every curve")
    args = ap.parse_args()
    models = tempfile.mkdtemp(prefix="phalanx-sharing-")
    scenarios = [s for s in args.scenarios.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    results: dict = {}
    curves: dict = {}
    for sc in scenarios:
        results[sc], curves[sc] = {}, {}
        for mode in modes:
            cfg = TrainConfig(models=models, name=f"{sc}-{mode}", scenario=sc, sharing=mode, steps=args.steps,
                              eval_every=args.eval_every, eval_episodes=args.eval_episodes, seed=args.seed,
                              progress=False)
            run = train(cfg)
            hist = run.history
            hit = next((r for r in hist if r["win_rate"] >= args.target), None)
            results[sc][mode] = {"samples_to_target": hit["samples"] if hit else None,
                                 "steps_to_target": hit["steps"] if hit else None,
                                 "minutes_to_target": hit["minutes"] if hit else None,
                                 "final_win_rate": run.summary["final_eval_win_rate"],
                                 "best_win_rate": run.summary["best_eval_win_rate"],
                                 "minutes": run.summary["minutes"], "samples": run.summary["samples"]}
            curves[sc][mode] = [(r["samples"], r["win_rate"]) for r in hist]
            r = results[sc][mode]
            print(f"{sc:>6} {mode:>11}: target {args.target} at {r['samples_to_target']} samples / "
                  f"{r['minutes_to_target']} min; final {r['final_win_rate']:.3f}, best {r['best_win_rate']:.3f}",
                  flush=True)
        s, i = results[sc].get("shared", {}), results[sc].get("independent", {})
        if s.get("samples_to_target") and i:
            need = i.get("samples_to_target")
            results[sc]["independent_over_shared"] = (need / s["samples_to_target"]) if need else f"> {results[sc]['independent']['samples'] / s['samples_to_target']:.2f} (independent never reached the target)"

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.5), squeeze=False,
                             constrained_layout=True)
    for ax, sc in zip(axes[0], scenarios):
        for mode in modes:
            xs, ys = zip(*curves[sc][mode]) if curves[sc][mode] else ((), ())
            ax.plot(xs, ys, marker=".", label=mode)
        ax.axhline(args.target, color="grey", ls="--", lw=0.8)
        ax.set(title=f"{sc}: equal samples", xlabel="unit samples", ylabel="greedy win rate", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(args.out, dpi=100)
    print(json.dumps({"bench": "sharing", "steps": args.steps, "target": args.target, "plot": args.out,
                      "results": results}))


if __name__ == "__main__":
    main()
