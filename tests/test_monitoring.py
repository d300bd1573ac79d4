"""The alerting rules operators load (service/monitoring/alerts.yml), checked with Prometheus's own promtool: the
rules parse, each fires on the made-up series of alerts_test.yml exactly when it should, they name only metrics
the service really exports, and both exports pass promtool's naming lint.

promtool ships with Debian's `prometheus` package (`.ci/run` installs it); the tests that run it skip without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import ServiceMetrics
from trainer.train_metrics import TrainMetrics

MONITORING = Path(__file__).resolve().parent.parent / "service" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool on PATH (Debian's prometheus package; "
                                                             ".ci/run installs it)")


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=MONITORING, input=stdin, capture_output=True, timeout=60)


@needs_promtool
def test_the_alert_rules_and_the_example_config_load():
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        done = _promtool(*args)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


@needs_promtool
def test_each_alert_fires_when_it_should_and_not_otherwise():
    done = _promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0 and b"SUCCESS" in done.stdout, done.stdout.decode() + done.stderr.decode()


def _service_exposition() -> str:
    """What a service that has answered nothing yet exports."""
    return generate_latest(ServiceMetrics(CollectorRegistry()).registry).decode()


def test_the_rules_name_only_series_and_label_values_the_service_exports_from_the_start():
    """A metric renamed in service/metrics.py or trainer/train_metrics.py would leave its alert silently matching
    nothing; a labelled series that appears only at its first increment loses that increment to increase() (a
    one-off shard write failure would never alert)."""
    rules = (MONITORING / "alerts.yml").read_text()
    train = generate_latest(TrainMetrics(scenario="3m", model="m").registry).decode()
    lines = (_service_exposition() + train).splitlines()
    exported = {line.split("{")[0].split(" ")[0] for line in lines if line.startswith("phalanx_")}
    exported |= {line.split()[2] for line in lines if line.startswith("# TYPE ")}  # histograms by their base name
    named = set(re.findall(r"\bphalanx_[a-z_]+", rules))
    assert len(named) >= 7, f"the rules name too few phalanx_* series: {sorted(named)}"
    assert named <= exported, f"rules name series the service does not export: {sorted(named - exported)}"
    for reason in re.findall(r'reason="([a-z_]+)"', rules):
        assert any(f'reason="{reason}"' in line for line in lines), f"no series with reason={reason!r} at start"
    codes = {code for alternatives in re.findall(r'code=~"([A-Z_|]+)"', rules) for code in alternatives.split("|")}
    known = set(grpc.StatusCode.__members__)
    assert codes and codes <= known, f"not gRPC status codes: {sorted(codes - known)}"
    for code in codes:
        assert any(f'code="{code}"' in line for line in lines), f"no phalanx_requests_total with code={code!r} at start"


@needs_promtool
def test_the_exported_metrics_pass_promtools_naming_lint():
    service = _service_exposition()
    train = generate_latest(TrainMetrics(scenario="3m", model="m").registry).decode()
    for text in (service, train):
        done = _promtool("check", "metrics", stdin=text.encode())
        assert done.returncode == 0 and not done.stdout.strip(), done.stdout.decode() + done.stderr.decode()


def test_a_training_figure_not_measured_yet_reads_nan_not_zero():
    """Before the first evaluation phalanx_train_eval_win_rate read 0.0, a result no run had produced."""
    import math

    from prometheus_client.parser import text_string_to_metric_families

    def values(metrics):
        text = generate_latest(metrics.registry).decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    metrics = TrainMetrics(scenario="3m", model="m")
    before = values(metrics)
    for name in ("eval_win_rate", "eval_episode_return", "train_win_rate", "policy_loss", "entropy"):
        assert math.isnan(before[f"phalanx_train_{name}"]), name
    assert before["phalanx_train_steps"] == 0 and before["phalanx_train_model_version"] == 0
    metrics.update_eval(win_rate=0.0, mean_return=3.5, version=1)
    after = values(metrics)
    assert after["phalanx_train_eval_win_rate"] == 0.0 and after["phalanx_train_model_version"] == 1
