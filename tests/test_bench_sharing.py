"""bench/sharing.py's bookkeeping: per-mode overrides, the summary's ratio and its bootstrap interval.

The sharing goal is read from these numbers, so a slip here (a ratio over the wrong seeds, an override that
reaches the wrong mode, a mean over unequal budgets) would misreport the project's main figure."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_sharing", os.path.join(os.path.dirname(__file__), "..", "bench", "sharing.py"))
sharing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sharing)


def test_mode_overrides_apply_common_fields_to_every_mode_and_own_fields_to_one():
    per_mode = sharing.mode_overrides({"envs": 64, "lr": 5e-4, "independent.lr": 2.5e-4,
                                       "independent.steps": 2_500_000}, ["shared", "independent"])
    assert per_mode["shared"] == {"envs": 64, "lr": 5e-4}
    assert per_mode["independent"] == {"envs": 64, "lr": 2.5e-4, "steps": 2_500_000}


@pytest.mark.parametrize("key, message", [
    ("per-type.lr", "not one of --modes"),      # a mode that is not run
    ("independent.lrr", "no field 'lrr'"),      # a typo in the field
    ("lrr", "no field 'lrr'"),
    ("sharing", "set by the benchmark"),        # would make every mode the same
    ("independent.seed", "set by the benchmark"),
])
def test_mode_overrides_refuse_what_would_run_something_else(key, message):
    with pytest.raises(SystemExit, match=message):
        sharing.mode_overrides({key: 1}, ["shared", "independent"])


def test_mean_win_rate_stops_at_the_common_budget():
    history = [{"steps": s, "win_rate": w} for s, w in ((100, 0.2), (200, 0.4), (300, 1.0), (400, 1.0))]
    assert sharing.mean_win_rate(history) == pytest.approx(0.65)
    assert sharing.mean_win_rate(history, up_to_steps=200) == pytest.approx(0.3)


def test_median_interval_brackets_the_median_and_repeats():
    values = [1.5, 2.0, 2.2, 3.4, 11.0]
    lo, hi = sharing.median_interval(values)
    assert lo <= 2.2 <= hi
    assert lo >= 1.5 and hi <= 11.0
    assert sharing.median_interval(values) == [lo, hi]
    assert sharing.median_interval([2.0, 2.0, 2.0]) == [2.0, 2.0]


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
    lo, hi = out["independent_over_shared_interval"]
    assert 1.0 <= lo <= 3.0 <= hi <= 5.0
