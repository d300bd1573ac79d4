"""bench/sharing.py's bookkeeping: per-mode overrides, the summary's ratio and the interval for its median.

The sharing goal is read from these numbers, so a slip here (a ratio over the wrong seeds, an override that
reaches the wrong mode, a mean over unequal budgets) would misreport the project's main figure."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_sharing", os.path.join(os.path.dirname(__file__), "..", "bench", "sharing.py"))
sharing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sharing)


CONSTANT = {"anneal_lr": False, "ent_coef_final": None}


def test_mode_overrides_apply_common_fields_to_every_mode_and_own_fields_to_one():
    per_mode = sharing.mode_overrides({"envs": 64, "lr": 5e-4, "independent.lr": 2.5e-4, **CONSTANT,
                                       "independent.steps": 2_500_000, "shared:one-unit.lr": 1e-3},
                                      ["shared", "shared:one-unit", "independent"])
    assert per_mode["shared"] == {"envs": 64, "lr": 5e-4, **CONSTANT}
    assert per_mode["shared:one-unit"] == {"envs": 64, "lr": 1e-3, **CONSTANT}
    assert per_mode["independent"] == {"envs": 64, "lr": 2.5e-4, "steps": 2_500_000, **CONSTANT}


def test_budgets_differ_only_with_constant_schedules():
    """An annealed run of a longer budget has a larger step and bonus at every step: another run, not a longer
    look at the same curve."""
    with pytest.raises(SystemExit, match="constant schedules"):
        sharing.mode_overrides({"independent.steps": 2_500_000}, ["shared", "independent"])
    with pytest.raises(SystemExit, match="constant schedules"):
        sharing.mode_overrides({"anneal_lr": False, "independent.steps": 2_500_000}, ["shared", "independent"])


@pytest.mark.parametrize("key, message", [
    ("per-type.lr", "not one of --modes"),      # a mode that is not run
    ("independent.lrr", "no field 'lrr'"),      # a typo in the field
    ("lrr", "no field 'lrr'"),
    ("sharing", "benchmark's own"),             # would make every mode the same
    ("independent.seed", "benchmark's own"),
    ("steps", "use --steps"),                  # one budget for all: the flag, reported as such
    ("independent.target_win_rate", "use --target"),  # would stop a curve at its first crossing
    ("independent.eval_every", "use --eval-every"),   # would read the modes on different grids
])
def test_mode_overrides_refuse_what_would_run_something_else(key, message):
    with pytest.raises(SystemExit, match=message):
        sharing.mode_overrides({key: 1}, ["shared", "independent"])


def test_mean_win_rate_stops_at_the_common_budget():
    history = [{"steps": s, "win_rate": w} for s, w in ((100, 0.2), (200, 0.4), (300, 1.0), (400, 1.0))]
    assert sharing.mean_win_rate(history) == pytest.approx(0.65)
    assert sharing.mean_win_rate(history, up_to_steps=200) == pytest.approx(0.3)


def test_median_interval_is_the_order_statistics_with_their_coverage():
    # five seeds: only the whole range reaches 90% (1 - 2/32); three seeds: the range, 75%
    assert sharing.median_interval([11.0, 2.0, 1.5, 3.4, 2.2]) == ([1.5, 11.0], 0.938)
    assert sharing.median_interval([3.0, 1.0, 2.0]) == ([1.0, 3.0], 0.75)
    # fifteen seeds: the 4th smallest and 4th largest (1 - 2 P(Bin(15, 1/2) <= 3) = 0.965; the 5th: 0.882)
    assert sharing.median_interval([float(v) for v in range(15, 0, -1)]) == ([4.0, 12.0], 0.965)


def test_summary_counts_missed_targets_as_the_whole_budget():
    def run(samples_to_target, budget=1000):
        return {"samples_to_target": samples_to_target, "samples": budget}

    runs = {("8m", "shared", 0): run(100), ("8m", "independent", 0): run(300),
            ("8m", "shared", 1): run(200), ("8m", "independent", 1): run(None),         # independent missed
            ("8m", "shared", 2): run(None), ("8m", "independent", 2): run(None)}        # both missed
    out = sharing.summarise(runs, ["8m"], ["shared", "independent"], [0, 1, 2])["8m"]
    assert out["independent_over_shared_per_seed"] == [3.0, 5.0, 1.0]
    assert out["independent_over_shared"] == 3.0
    assert out["lower_bound"] is True
    assert out["shared_missed"] == 1
    assert out["independent_over_shared_interval"] == [1.0, 5.0]
    assert out["independent_over_shared_coverage"] == 0.75


def test_a_seed_where_shared_missed_counts_at_most_1_whatever_independents_budget():
    """Independent given 2.5x the budget: where shared missed, its longer budget (or a late crossing) over
    shared's shorter one would read as evidence for sharing."""
    runs = {("2s3z", "shared", 0): {"samples_to_target": None, "samples": 1000},
            ("2s3z", "independent", 0): {"samples_to_target": None, "samples": 2500},
            ("2s3z", "shared", 1): {"samples_to_target": None, "samples": 1000},
            ("2s3z", "independent", 1): {"samples_to_target": 600, "samples": 2500}}
    out = sharing.summarise(runs, ["2s3z"], ["shared", "independent"], [0, 1])["2s3z"]
    assert out["independent_over_shared_per_seed"] == [1.0, 0.6]


def _logged_run(root, name, scenario, curve, training=None):
    """A run directory as `phalanx train` leaves it: the CSV of its evaluations, and a card per version."""
    import csv
    import json

    logs = root / name / "logs"
    logs.mkdir(parents=True)
    with open(logs / f"{name}-{scenario}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["steps", "minutes", "samples", "win_rate", "lr"])
        w.writeheader()
        for i, rate in enumerate(curve, 1):
            w.writerow({"steps": 100 * i, "minutes": 0.1 * i, "samples": 500 * i, "win_rate": rate, "lr": 5e-4})
    (root / name / str(len(curve))).mkdir()
    card = {"name": name, **({"training": training} if training is not None else {})}
    (root / name / str(len(curve)) / "card.json").write_text(json.dumps(card))


def test_from_logs_combines_batches_and_keeps_the_longer_of_a_repeated_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _logged_run(a, "8m-shared-0", "8m", [0.2, 0.95])
    _logged_run(a, "8m-independent-0", "8m", [0.1, 0.5])
    _logged_run(b, "8m-independent-0", "8m", [0.1, 0.5, 0.7, 0.92])  # the same run, longer
    _logged_run(b, "8m-shared-1", "8m", [0.93])
    _logged_run(b, "8m-independent-1", "8m", [0.4, 0.6])
    runs = sharing.load_runs([str(a), str(b)], ["8m"], ["shared", "independent"], [0, 1])
    assert [h["win_rate"] for h in runs["8m", "independent", 0]] == [0.1, 0.5, 0.7, 0.92]
    assert runs["8m", "shared", 1] == [{"steps": 100, "samples": 500, "minutes": 0.1, "win_rate": 0.93}]
    # MODE=DIR: only that mode's runs are read there
    with pytest.raises(SystemExit, match="no run 8m-independent-1"):
        sharing.load_runs([str(a), f"shared={b}"], ["8m"], ["shared", "independent"], [0, 1])


def test_from_logs_refuses_runs_that_do_not_belong_together(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _logged_run(a, "8m-shared-0", "8m", [0.2, 0.95])
    _logged_run(b, "8m-shared-0", "8m", [0.3, 0.95, 0.97])  # same name, another curve: other settings
    with pytest.raises(SystemExit, match="differ"):
        sharing.load_runs([str(a), str(b)], ["8m"], ["shared"], [0])
    c = tmp_path / "c"
    constant = {"lr": 5e-4, "envs": 64, "anneal_lr": False, "ent_coef_final": None}
    _logged_run(c, "8m-shared-0", "8m", [0.2], training={**constant, "seed": 0, "steps": 100})
    _logged_run(c, "8m-shared-1", "8m", [0.2], training={**constant, "seed": 1, "steps": 900})
    assert len(sharing.load_runs([str(c)], ["8m"], ["shared"], [0, 1])) == 2  # seed and budget may differ
    _logged_run(c, "8m-shared-2", "8m", [0.2], training={**constant, "lr": 1e-3, "seed": 2, "steps": 100})
    with pytest.raises(SystemExit, match=r"seed 2 was trained with other settings .*\(lr\)"):
        sharing.load_runs([str(c)], ["8m"], ["shared"], [0, 1, 2])
    # annealed over its budget, a longer run is another run at every step: budgets must agree then
    annealed = {"lr": 5e-4, "envs": 64, "anneal_lr": True, "ent_coef_final": 0.02}
    _logged_run(c, "8m-independent-0", "8m", [0.2], training={**annealed, "seed": 0, "steps": 100})
    _logged_run(c, "8m-independent-1", "8m", [0.2], training={**annealed, "seed": 1, "steps": 900})
    with pytest.raises(SystemExit, match=r"seed 1 was trained with other settings .*\(steps\)"):
        sharing.load_runs([str(c)], ["8m"], ["independent"], [0, 1])
    with pytest.raises(SystemExit, match="not one of --modes"):
        sharing.load_runs([f"per-type={c}"], ["8m"], ["shared"], [0])
