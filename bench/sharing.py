"""The case for parameter sharing: shared vs per-type vs independent at equal samples.

    python bench/sharing.py --scenarios 8m --modes shared,independent --set envs=64 --seeds 0,1,2 --jobs 2 --out sharing_8m.png
    python bench/sharing.py --scenarios 2s3z --set envs=64 --seeds 0,1,2 --jobs 2 --out sharing_2s3z.png
    python bench/sharing.py --scenarios 3m --steps 200000 --out /tmp/sharing.png     # a quick check
    python bench/sharing.py --scenarios 2s3z --modes shared,independent --set envs=64 --set anneal_lr=false \
        --set independent.lr=2.5e-4 --seeds 0,1,2,3,4 --jobs 2      # each mode at its own learning rate

Every mode trains for the same number of environment steps (so about the same number of unit samples) from
the same seeds with `phalanx train`'s defaults (plus any --set overrides, the same for every mode); the
greedy win rate is evaluated every --eval-every steps. (On 8m per-type is shared: one unit type, one group.)
`--set MODE.FIELD=VALUE` overrides a field for one mode only: each mode at its own learning rate, say, or a
longer budget (`independent.steps=2500000`) for a mode that needs it; with constant schedules
(`anneal_lr=false`, no `ent_coef_final`) a run's curve does not depend on its budget.

Two measures of "reached the target", per run: `first`, the first evaluation at or above it, and
`sustained`, the first evaluation at which the mean of the last --window evaluations is (a greedy policy can
swing by tens of points between checkpoints, so a single evaluation above the target can be luck). For each,
per scenario and mode: the unit samples each seed needed (a seed that never got there counts its whole
budget) and the median over seeds; every curve (win rate against samples) goes into one PNG. Also per run:
the mean of its evaluations up to the smallest budget of any mode (the area under its curve). Ends with one
JSON line whose `independent_over_shared` is the median over seeds of the samples independent learners
needed divided by those shared needed (the goal: >= 2), a missed target counting the whole budget on either
side: a lower bound where independent never got there, about 1 where neither did; with it a 90% bootstrap
interval over seeds (`..._interval`), since a handful of seeds leaves the median uncertain.
--jobs runs that many trainings at once, one core each.

A mode may name which samples train the actor after a colon (TrainConfig.actor_rows): `shared:one-unit` trains
the shared network on one random live unit per game step, `shared:game-subset` on every live unit of a random
share of the game steps (as many samples). Both play the same games as `shared`; they probe where sharing's gain
comes from (more units per game step, or more game steps):

    python bench/sharing.py --scenarios 8m --modes shared,shared:one-unit,shared:game-subset,independent --set envs=64 --seeds 0,1,2 --jobs 2
"""

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench._overrides import parse_overrides  # noqa: E402
from trainer.ppo import TrainConfig, target_held, train  # noqa: E402

MODES = ("shared", "per-type", "independent")


def first_hit(history: list[dict], target: float, window: int = 1) -> dict | None:
    """The first evaluation at which the mean win rate of the last `window` evaluations (this one included)
    reaches the target. window=1: the first evaluation above it; a wider window asks the policy to stay there,
    which a lucky evaluation of a policy that swings between checkpoints does not."""
    return next((history[i] for i in range(len(history)) if target_held(history[:i + 1], target, window)), None)


def mode_fields(mode: str) -> dict:
    """"shared" -> sharing mode shared; "shared:one-unit" -> the same, its actor trained on those rows."""
    sharing, _, rows = mode.partition(":")
    return {"sharing": sharing, "actor_rows": rows or "all"}


def run_one(cfg: TrainConfig) -> dict:
    """One training run (in a worker process when --jobs > 1): its evaluation history and summary."""
    run = train(cfg)
    return {"history": run.history, "summary": run.summary}


def mean_win_rate(history: list[dict], up_to_steps: int | None = None) -> float:
    """The mean of a run's evaluations (those at or before up_to_steps): evaluations are evenly spaced in steps,
    so over equal budgets this is the area under the win-rate curve, a measure of learning speed that one lucky
    or unlucky checkpoint barely moves."""
    rates = [h["win_rate"] for h in history if up_to_steps is None or h["steps"] <= up_to_steps]
    return statistics.fmean(rates) if rates else 0.0


def median_interval(values: list[float], level: float = 0.9, resamples: int = 2000) -> list[float]:
    """A bootstrap interval for the median of per-seed values: resample the seeds with replacement and take the
    middle `level` of the resampled medians. Seeded, so the same runs always print the same interval."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = round((1 - level) / 2 * resamples)
    return [round(float(medians[tail]), 3), round(float(medians[resamples - 1 - tail]), 3)]


def mode_overrides(overrides: dict, modes: list[str]) -> dict[str, dict]:
    """{"envs": 64, "independent.lr": 2.5e-4} -> each mode's TrainConfig overrides: the common ones, then its
    own. Names are checked here, before any run starts, so a typo does not surface as a worker's traceback."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    common: dict = {}
    own: dict = {m: {} for m in modes}
    for key, value in overrides.items():
        mode, dot, field = key.rpartition(".")
        if dot and mode not in own:
            raise SystemExit(f"--set {key}: {mode!r} is not one of --modes ({','.join(modes)})")
        if field not in fields:
            raise SystemExit(f"--set {key}: TrainConfig has no field {field!r}")
        if field in ("scenario", "sharing", "actor_rows", "seed", "name", "models"):
            raise SystemExit(f"--set {key}: {field} is set by the benchmark itself (--scenarios, --modes, --seeds)")
        (own[mode] if dot else common)[field] = value
    return {m: {**common, **own[m]} for m in modes}


def to_target(history: list[dict], summary: dict, target: float, window: int) -> dict:
    hit = first_hit(history, target, window)
    return {"samples_to_target": hit["samples"] if hit else None, "steps_to_target": hit["steps"] if hit else None,
            "minutes_to_target": hit["minutes"] if hit else None, "samples": summary["samples"]}


def summarise(runs: dict, scenarios: list, modes: list, seeds: list) -> dict:
    """Per scenario: each mode's samples to the target, median over seeds (a run that never got there counts
    as its whole budget, so the ratio is then a lower bound), and the goal's ratio independent / shared."""
    results: dict = {}
    for sc in scenarios:
        results[sc] = {}
        for mode in modes:
            per_seed = [runs[sc, mode, s] for s in seeds]
            need = [r["samples_to_target"] or r["samples"] for r in per_seed]
            results[sc][mode] = {"samples_to_target": float(statistics.median(need)),
                                 "reached": sum(r["samples_to_target"] is not None for r in per_seed),
                                 "runs": len(per_seed), "per_seed": [r["samples_to_target"] for r in per_seed]}
        if "shared" in modes and "independent" in modes:
            def need(mode, seed):  # a run that never got there counts its whole budget, whichever mode it is
                r = runs[sc, mode, seed]
                return r["samples_to_target"] or r["samples"]

            # Where shared missed too, the ratio is about 1 (both budgets) or below: no evidence for sharing,
            # counted as such rather than left out (leaving those seeds out would flatter sharing).
            per_seed = [round(need("independent", s) / need("shared", s), 3) for s in seeds]
            results[sc]["independent_over_shared"] = round(float(statistics.median(per_seed)), 3)
            results[sc]["independent_over_shared_interval"] = median_interval(per_seed)
            results[sc]["independent_over_shared_per_seed"] = per_seed  # in --seeds order
            results[sc]["lower_bound"] = any(runs[sc, "independent", s]["samples_to_target"] is None for s in seeds)
            results[sc]["shared_missed"] = sum(runs[sc, "shared", s]["samples_to_target"] is None for s in seeds)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="8m,2s3z")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=1_500_000, help="environment steps per run (equal for all modes)")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=3,
                    help="the 'sustained' measure: the mean of this many consecutive evaluations must reach the "
                         "target (the 'first' measure is the first single evaluation that does)")
    ap.add_argument("--eval-every", type=int, default=50_000)
    ap.add_argument("--eval-episodes", type=int, default=256)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; every mode runs once per seed")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes (one core each)")
    ap.add_argument("--out", default="sharing.png", help="PNG with every curve")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field for every mode, e.g. --set envs=64 (repeatable)")
    args = ap.parse_args()
    overrides = parse_overrides(args.set)
    models = tempfile.mkdtemp(prefix="phalanx-sharing-")
    scenarios = [s for s in args.scenarios.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    per_mode = mode_overrides(overrides, modes)
    keys = [(sc, mode, seed) for sc in scenarios for seed in seeds for mode in modes]
    configs = {(sc, mode, seed): TrainConfig(
        models=models, name=f"{sc}-{mode.replace(':', '-')}-{seed}", scenario=sc, **mode_fields(mode),
        **{"steps": args.steps, "eval_every": args.eval_every, "eval_episodes": args.eval_episodes, "seed": seed,
           "progress": False, **per_mode[mode]})
        for sc, mode, seed in keys}
    # the mean win rate compares curves over the budget every mode had
    common_steps = min(c.steps for c in configs.values()) if all(c.steps for c in configs.values()) else None
    print(f"{len(keys)} runs, {args.jobs} at a time; models and CSV logs under {models}", flush=True)

    measures = {"first": 1, "sustained": args.window}
    runs: dict = {m: {} for m in measures}  # measure -> (scenario, mode, seed) -> to_target(...)
    curves: dict = {}  # (scenario, mode, seed) -> [(samples, win rate)]
    means: dict = {}  # (scenario, mode, seed) -> mean evaluation win rate
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, configs[k]): k for k in keys}
        for fut in concurrent.futures.as_completed(futures):
            sc, mode, seed = key = futures[fut]
            out = fut.result()
            for m, window in measures.items():
                runs[m][key] = to_target(out["history"], out["summary"], args.target, window)
            curves[key] = [(h["samples"], h["win_rate"]) for h in out["history"]]
            means[key] = mean_win_rate(out["history"], common_steps)
            first, sustained = runs["first"][key], runs["sustained"][key]
            print(f"{sc:>6} {mode:>18} seed {seed}: target {args.target} first at {first['samples_to_target']} "
                  f"samples / {first['minutes_to_target']} min, sustained ({args.window} evaluations) at "
                  f"{sustained['samples_to_target']} samples; final {out['summary']['final_eval_win_rate']:.3f}, "
                  f"best {out['summary']['best_eval_win_rate']:.3f}, mean {means[key]:.3f}",
                  flush=True)

    results = {m: summarise(runs[m], scenarios, modes, seeds) for m in measures}
    # the whole curve at once, where samples-to-target reads one crossing of a noisy line
    results["mean_win_rate"] = {sc: {mode: round(statistics.median(means[sc, mode, s] for s in seeds), 3)
                                     for mode in modes} for sc in scenarios}
    upto = f" up to step {common_steps:,}" if common_steps else ""
    print(f"\nmean greedy win rate over each run's evaluations{upto} (median over seeds): {results['mean_win_rate']}")
    for m in measures:
        print(f"\n{m}: {'scenario':>8} {'mode':>18} {'median samples to target':>26} {'reached':>8}")
        for sc in scenarios:
            for mode in modes:
                r = results[m][sc][mode]
                print(f"{sc:>8} {mode:>18} {r['samples_to_target']:>26,.0f} {r['reached']:>5}/{r['runs']}")
            if "independent_over_shared" in results[m][sc]:
                r = results[m][sc]
                print(f"{sc:>8} independent / shared = {r['independent_over_shared']} (90% interval "
                      f"{r['independent_over_shared_interval']}; per seed "
                      f"{r['independent_over_shared_per_seed']}; a lower bound: {r['lower_bound']}; seeds where "
                      f"shared missed: {r['shared_missed']})")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.5), squeeze=False,
                             constrained_layout=True)
    colors = dict(zip(MODES + ("shared:one-unit", "shared:game-subset"),
                      ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red")))
    for ax, sc in zip(axes[0], scenarios):
        for mode in modes:
            for i, seed in enumerate(seeds):
                xs, ys = zip(*curves[sc, mode, seed]) if curves[sc, mode, seed] else ((), ())
                ax.plot(xs, ys, marker=".", color=colors.get(mode), alpha=0.9 if i == 0 else 0.5,
                        label=mode if i == 0 else None)
        ax.axhline(args.target, color="grey", ls="--", lw=0.8)
        ax.set(title=f"{sc}: equal samples, seeds {args.seeds}", xlabel="unit samples", ylabel="greedy win rate",
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(args.out, dpi=100)
    print(json.dumps({"bench": "sharing", "steps": args.steps, "target": args.target, "window": args.window,
                      "seeds": seeds,
                      "overrides": overrides, "plot": args.out, "results": results}))


if __name__ == "__main__":
    main()
