"""The case for parameter sharing: shared vs per-type vs independent at equal samples.

    python bench/sharing.py --scenarios 8m --modes shared,independent --set envs=64 --seeds 0,1,2 --jobs 2 --out sharing_8m.png
    python bench/sharing.py --scenarios 2s3z --set envs=64 --seeds 0,1,2 --jobs 2 --out sharing_2s3z.png
    python bench/sharing.py --scenarios 3m --steps 200000 --out /tmp/sharing.png     # a quick check
    python bench/sharing.py --scenarios 2s3z --modes shared,independent --set envs=64 --set anneal_lr=false \
        --set ent_coef=0.05 --set ent_coef_final=null --set independent.lr=2.5e-4 --seeds 0,1,2,3,4 --jobs 2
        # each mode at its own learning rate, with no schedule

Every mode trains for the same number of environment steps (so about the same number of unit samples) from
the same seeds with `phalanx train`'s defaults plus the --set overrides; the greedy win rate is evaluated
every --eval-every steps. (On 8m per-type is shared: one unit type, one group.) `--set FIELD=VALUE` sets a
TrainConfig field for every mode, `--set MODE.FIELD=VALUE` for one mode only: each mode at its own learning
rate, say, or a longer budget (`independent.steps=2500000`) for a mode that needs it. Budgets may differ only
with constant schedules (`anneal_lr=false`, `ent_coef_final=null`): then a run's curve does not depend on its
budget, while an annealed run of a longer budget would be a different run at every step.

Two measures of "reached the target", per run: `first`, the first evaluation at or above it, and
`sustained`, the first evaluation at which the mean of the last --window evaluations is (a greedy policy can
swing by tens of points between checkpoints, so a single evaluation above the target can be luck). For each,
per scenario and mode: the unit samples each seed needed (a seed that never got there counts its whole
budget) and the median over seeds; every curve (win rate against samples) goes into one PNG. Also per run:
the mean of its evaluations up to where the shortest run ended (the area under its curve). Ends with one
JSON line whose `independent_over_shared` is the median over seeds of the samples independent learners
needed divided by those shared needed (the goal: >= 2). A missed target counts the whole budget: where
independent missed, the seed's ratio is a lower bound; where shared missed, a seed is no evidence for sharing
and counts as at most 1 (min(independent's need, shared's budget) / shared's budget). With the median, a
distribution-free interval for it (`..._interval`: the order statistics that hold the true median with at
least 90% probability, or as near as the number of seeds allows, the probability given as `..._coverage`),
since a handful of seeds leaves the median uncertain.
--jobs runs that many trainings at once, one core each.

`--from-logs` trains nothing and reports on runs already made, from their CSV logs: batches of seeds run apart
together, or the same curves read at another --target or --window:

    python bench/sharing.py --from-logs /tmp/phalanx-sharing-AAA,/tmp/phalanx-sharing-BBB --scenarios 2s3z \
        --modes shared,independent --seeds 0,1,2,3,4,5 --target 0.8
    python bench/sharing.py --from-logs shared=/tmp/phalanx-sharing-AAA,independent=/tmp/phalanx-sharing-CCC ...

A mode may name which samples train the actor after a colon (TrainConfig.actor_rows): `shared:one-unit` trains
the shared network on one random live unit per game step, `shared:game-subset` on every live unit of a random
share of the game steps (as many samples). Both play the same games as `shared`; they probe where sharing's gain
comes from (more units per game step, or more game steps):

    python bench/sharing.py --scenarios 8m --modes shared,shared:one-unit,shared:game-subset,independent --set envs=64 --seeds 0,1,2 --jobs 2
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import json
import math
import multiprocessing
import os
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


def median_interval(values: list[float], level: float = 0.9) -> tuple[list[float], float]:
    """An interval for the median of the distribution the per-seed values come from, and its coverage.

    Distribution-free: each seed's value lies below the true median with probability 1/2, so the k-th smallest
    and k-th largest of n values bracket it with probability 1 - 2 P(Binomial(n, 1/2) < k). k is the largest
    with a coverage of at least `level`; with too few seeds for that (n <= 4 at 90%) the interval is the whole
    range and the coverage says how much less it is (75% for three seeds). A bootstrap would print the same
    range for five seeds or fewer and call it 90%."""
    n = len(values)
    ordered = sorted(values)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = max([k for k in range(1, (n + 1) // 2 + 1) if coverage(k) >= level], default=1)
    return [round(float(ordered[k - 1]), 3), round(float(ordered[n - k]), 3)], round(coverage(k), 3)


# Fields the benchmark sets itself, or that would cut a curve short or measure it on another grid.
_RESERVED = {"scenario": "--scenarios", "sharing": "--modes", "actor_rows": "--modes", "seed": "--seeds",
             "name": "", "models": "", "progress": "", "steps": "--steps", "eval_every": "--eval-every",
             "eval_episodes": "--eval-episodes", "minutes": "--steps", "target_win_rate": "--target",
             "target_window": "--window", "resume": ""}


def mode_overrides(overrides: dict, modes: list[str]) -> dict[str, dict]:
    """{"envs": 64, "independent.lr": 2.5e-4} -> each mode's TrainConfig overrides: the common ones, then its
    own. Names are checked here, before any run starts, so a typo does not surface as a worker's traceback.
    One mode may have its own `steps` (a longer budget for a slow learner), but only with constant schedules."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    common: dict = {}
    own: dict = {m: {} for m in modes}
    for key, value in overrides.items():
        mode, dot, field = key.rpartition(".")
        if dot and mode not in own:
            raise SystemExit(f"--set {key}: {mode!r} is not one of --modes ({','.join(modes)})")
        if field not in fields:
            raise SystemExit(f"--set {key}: TrainConfig has no field {field!r}")
        if field in _RESERVED and not (dot and field == "steps"):
            flag = _RESERVED[field]
            raise SystemExit(f"--set {key}: {field} is the benchmark's own" + (f" (use {flag})" if flag else ""))
        (own[mode] if dot else common)[field] = value
    per_mode = {m: {**common, **own[m]} for m in modes}
    if any("steps" in o for o in own.values()):
        defaults = TrainConfig(models=".", name="x")
        for m, o in per_mode.items():
            if o.get("anneal_lr", defaults.anneal_lr) or o.get("ent_coef_final", defaults.ent_coef_final) is not None:
                raise SystemExit(f"--set MODE.steps: budgets may differ only with constant schedules (--set "
                                 f"anneal_lr=false --set ent_coef_final=null); mode {m!r} anneals over its budget")
    return per_mode


def to_target(history: list[dict], summary: dict, target: float, window: int) -> dict:
    hit = first_hit(history, target, window)
    return {"samples_to_target": hit["samples"] if hit else None, "steps_to_target": hit["steps"] if hit else None,
            "minutes_to_target": hit["minutes"] if hit else None, "samples": summary["samples"]}


def summarise(runs: dict, scenarios: list, modes: list, seeds: list) -> dict:
    """Per scenario: each mode's samples to the target, median over seeds (a run that never got there counts
    as its whole budget), and the goal's ratio independent / shared (see the module's docstring)."""
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
            def ratio(seed):
                shared, independent = runs[sc, "shared", seed], runs[sc, "independent", seed]
                need = independent["samples_to_target"] or independent["samples"]  # missed: a lower bound
                if shared["samples_to_target"] is None:
                    # No evidence for sharing: counted as at most 1 rather than left out (leaving it out would
                    # flatter sharing), and not as independent's longer budget over shared's shorter one.
                    return min(need, shared["samples"]) / shared["samples"]
                return need / shared["samples_to_target"]

            per_seed = [round(ratio(s), 3) for s in seeds]
            results[sc]["independent_over_shared"] = round(float(statistics.median(per_seed)), 3)
            interval, coverage = median_interval(per_seed)
            results[sc]["independent_over_shared_interval"] = interval
            results[sc]["independent_over_shared_coverage"] = coverage
            results[sc]["independent_over_shared_per_seed"] = per_seed  # in --seeds order
            results[sc]["lower_bound"] = any(runs[sc, "independent", s]["samples_to_target"] is None for s in seeds)
            results[sc]["shared_missed"] = sum(runs[sc, "shared", s]["samples_to_target"] is None for s in seeds)
    return results


def _own_settings(recorded: dict) -> set[str]:
    """Settings that may differ between runs of one mode read together: each seed's own, and with constant
    schedules the budget (a longer run is then the same curve, continued; an annealed one is another run)."""
    constant = recorded.get("anneal_lr") is False and recorded.get("ent_coef_final", 0) is None
    return {"seed", "steps", "minutes"} if constant else {"seed"}


def load_runs(sources: list[str], scenarios: list[str], modes: list[str], seeds: list[int]) -> dict:
    """Earlier runs of this benchmark, from their CSV logs: {(scenario, mode, seed): evaluations}.

    Each source is a `models and CSV logs under DIR` directory that a run of this benchmark printed, or
    MODE=DIR to read only that mode's runs there (when DIR also holds that mode at settings not wanted). The same
    run may lie in several (a batch repeated with a longer budget): the longer is kept, after checking that the
    shorter is the start of it, so runs of other settings under the same name are refused, not mixed. Where the
    cards record the settings (`training`), every seed of one mode must have been trained alike."""
    dirs_of: dict = {mode: [] for mode in modes}
    for source in sources:
        mode, eq, d = source.rpartition("=")
        if eq and mode not in dirs_of:
            raise SystemExit(f"--from-logs {source}: {mode!r} is not one of --modes ({','.join(modes)})")
        if not os.path.isdir(d):
            raise SystemExit(f"--from-logs {source}: {d} is not a directory")
        for m in ([mode] if eq else modes):
            dirs_of[m].append(d)
    histories: dict = {}
    found_in: dict = {}
    settings: dict = {}
    for sc in scenarios:
        for mode in modes:
            for seed in seeds:
                name = f"{sc}-{mode.replace(':', '-')}-{seed}"
                for d in dirs_of[mode]:
                    csv_path = os.path.join(d, name, "logs", f"{name}-{sc}.csv")
                    if not os.path.isfile(csv_path):
                        continue
                    with open(csv_path, newline="") as f:
                        history = [{"steps": int(r["steps"]), "samples": int(r["samples"]),
                                    "minutes": float(r["minutes"]), "win_rate": float(r["win_rate"])}
                                   for r in csv.DictReader(f)]
                    if not history:
                        continue
                    key = (sc, mode, seed)
                    if key in histories:
                        short, long_ = sorted((histories[key], history), key=len)
                        same = [(h["steps"], h["win_rate"]) for h in short] == [
                            (h["steps"], h["win_rate"]) for h in long_[:len(short)]]
                        if not same:
                            raise SystemExit(f"{name}: the runs in {found_in[key]} and {d} differ (other settings "
                                             f"under one name?); pass one of them")
                        if len(history) <= len(histories[key]):
                            continue
                    histories[key], found_in[key] = history, d
                    settings[key] = _recorded_settings(os.path.join(d, name))
                if (sc, mode, seed) not in histories:
                    raise SystemExit(f"no run {name} (its logs/{name}-{sc}.csv) in "
                                     f"{', '.join(dirs_of[mode]) or 'no directory given for ' + mode}")
    for sc in scenarios:
        for mode in modes:
            recorded = {seed: settings[sc, mode, seed] for seed in seeds if settings[sc, mode, seed] is not None}
            if len(recorded) < len(seeds):
                print(f"{sc} {mode}: {len(seeds) - len(recorded)} of {len(seeds)} runs do not record their "
                      f"settings (trained before the cards kept them): not checked", flush=True)
            if len(recorded) > 1:
                first, *rest = recorded.items()
                for seed, r in rest:
                    own = _own_settings(r) & _own_settings(first[1])
                    diff = sorted(k for k in set(r) | set(first[1]) if k not in own and r.get(k) != first[1].get(k))
                    if diff:
                        raise SystemExit(f"{sc} {mode}: seed {seed} was trained with other settings than seed "
                                         f"{first[0]} ({', '.join(diff)}); these runs do not belong together")
    return histories


def _recorded_settings(run_dir: str) -> dict | None:
    """The `training` settings on the card of a run's last version, or None (an older card, or no card)."""
    versions = [int(v) for v in os.listdir(run_dir) if v.isdigit()]
    if not versions:
        return None
    try:
        with open(os.path.join(run_dir, str(max(versions)), "card.json")) as f:
            return json.load(f).get("training")
    except (OSError, ValueError):
        return None


def train_runs(args, overrides: dict, scenarios: list, modes: list, seeds: list) -> tuple[dict, dict]:
    """Train every (scenario, mode, seed), --jobs at a time: ({key: evaluations}, {mode: its step budget})."""
    per_mode = mode_overrides(overrides, modes)
    models = tempfile.mkdtemp(prefix="phalanx-sharing-")
    keys = [(sc, mode, seed) for sc in scenarios for seed in seeds for mode in modes]
    configs = {(sc, mode, seed): TrainConfig(
        models=models, name=f"{sc}-{mode.replace(':', '-')}-{seed}", scenario=sc, **mode_fields(mode),
        **{"steps": args.steps, "eval_every": args.eval_every, "eval_episodes": args.eval_episodes, "seed": seed,
           "progress": False, **per_mode[mode]})
        for sc, mode, seed in keys}
    print(f"{len(keys)} runs, {args.jobs} at a time; models and CSV logs under {models}", flush=True)
    histories: dict = {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, configs[k]): k for k in keys}
        for fut in concurrent.futures.as_completed(futures):
            sc, mode, seed = key = futures[fut]
            out = fut.result()
            histories[key] = history = out["history"]
            first, sustained = (first_hit(history, args.target, w) for w in (1, args.window))
            print(f"{sc:>6} {mode:>18} seed {seed}: target {args.target} first at "
                  f"{first and first['samples']} samples / {first and first['minutes']} min, sustained "
                  f"({args.window} evaluations) at {sustained and sustained['samples']} samples; final "
                  f"{out['summary']['final_eval_win_rate']:.3f}, best {out['summary']['best_eval_win_rate']:.3f}",
                  flush=True)
    return histories, {mode: configs[scenarios[0], mode, seeds[0]].steps for mode in modes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="8m,2s3z")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=1_500_000,
                    help="environment steps per run (every mode's, unless --set MODE.steps=N gives one its own)")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=3,
                    help="the 'sustained' measure: the mean of this many consecutive evaluations must reach the "
                         "target (the 'first' measure is the first single evaluation that does)")
    ap.add_argument("--eval-every", type=int, default=50_000)
    ap.add_argument("--eval-episodes", type=int, default=256)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; every mode runs once per seed")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes (one core each)")
    ap.add_argument("--out", default="sharing.png", help="PNG with every curve")
    ap.add_argument("--from-logs", metavar="[MODE=]DIR,...",
                    help="train nothing: report on the runs of earlier invocations (the directories they printed; "
                         "MODE=DIR reads only that mode's runs there) at this --target and --window; batches of "
                         "seeds combine")
    ap.add_argument("--set", action="append", default=[], metavar="[MODE.]FIELD=VALUE",
                    help="override a TrainConfig field for every mode (--set envs=64) or for one mode "
                         "(--set independent.lr=2.5e-4); repeatable")
    args = ap.parse_args()
    overrides = parse_overrides(args.set)
    scenarios = [s for s in args.scenarios.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.from_logs:
        if overrides:
            raise SystemExit("--from-logs reads finished runs: --set has nothing to change there")
        histories = load_runs([x for x in args.from_logs.split(",") if x], scenarios, modes, seeds)
        steps = {mode: max(histories[sc, mode, s][-1]["steps"] for sc in scenarios for s in seeds) for mode in modes}
    else:
        histories, steps = train_runs(args, overrides, scenarios, modes, seeds)

    measures = {"first": 1, "sustained": args.window}
    # measure -> (scenario, mode, seed) -> samples to the target, and the run's budget (its last evaluation)
    runs = {m: {k: to_target(h, {"samples": h[-1]["samples"]}, args.target, window) for k, h in histories.items()}
            for m, window in measures.items()}
    results = {m: summarise(runs[m], scenarios, modes, seeds) for m in measures}
    # The whole curve at once, where samples-to-target reads one crossing of a noisy line; over the steps every
    # run had (a mode given a longer budget is cut where the shortest run ended).
    cut = min(h[-1]["steps"] for h in histories.values() if h) if any(histories.values()) else 0
    means = {k: round(mean_win_rate(h, cut), 3) for k, h in histories.items()}
    results["mean_win_rate"] = {sc: {mode: round(statistics.median(means[sc, mode, s] for s in seeds), 3)
                                     for mode in modes} for sc in scenarios}
    results["mean_win_rate_per_seed"] = {sc: {mode: [means[sc, mode, s] for s in seeds] for mode in modes}
                                         for sc in scenarios}
    results["mean_win_rate_up_to_step"] = cut
    print(f"\nmean greedy win rate over each run's evaluations up to step {cut:,}, per seed: "
          f"{results['mean_win_rate_per_seed']}; median over seeds: {results['mean_win_rate']}")
    for m in measures:
        print(f"\n{m}: {'scenario':>8} {'mode':>18} {'median samples to target':>26} {'reached':>8}")
        for sc in scenarios:
            for mode in modes:
                r = results[m][sc][mode]
                print(f"{sc:>8} {mode:>18} {r['samples_to_target']:>26,.0f} {r['reached']:>5}/{r['runs']}")
            if "independent_over_shared" in results[m][sc]:
                r = results[m][sc]
                print(f"{sc:>8} independent / shared = {r['independent_over_shared']} (interval "
                      f"{r['independent_over_shared_interval']} holds the median with probability "
                      f"{r['independent_over_shared_coverage']}; per seed "
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
                curve = [(h["samples"], h["win_rate"]) for h in histories[sc, mode, seed]]
                xs, ys = zip(*curve) if curve else ((), ())
                ax.plot(xs, ys, marker=".", color=colors.get(mode), alpha=0.9 if i == 0 else 0.5,
                        label=mode if i == 0 else None)
        ax.axhline(args.target, color="grey", ls="--", lw=0.8)
        ax.set(title=f"{sc}: seeds {args.seeds}", xlabel="unit samples", ylabel="greedy win rate",
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(args.out, dpi=100)
    print(json.dumps({"bench": "sharing", "steps": steps, "target": args.target, "window": args.window,
                      "eval_every": None if args.from_logs else args.eval_every, "from_logs": args.from_logs,
                      "seeds": seeds, "overrides": overrides, "plot": args.out,
                      "results": results}))


if __name__ == "__main__":
    main()
