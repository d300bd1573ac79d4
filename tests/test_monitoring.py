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
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    # one of every labelled series the rules select on, so each shows up in the exposition
    metrics.answered("Act", grpc.StatusCode.UNAVAILABLE, 0.01)
    metrics.shed.labels("queue_full").inc()
    metrics.experience_dropped.labels("write_failed").inc()
    return generate_latest(registry).decode()


def test_the_rules_name_only_series_and_label_values_the_service_exports():
    """A metric renamed in service/metrics.py would leave its alert silently matching nothing."""
    rules = (MONITORING / "alerts.yml").read_text()
    lines = _service_exposition().splitlines()
    exported = {line.split("{")[0].split(" ")[0] for line in lines if line.startswith("phalanx_")}
    exported |= {line.split()[2] for line in lines if line.startswith("# TYPE ")}  # histograms by their base name
    named = set(re.findall(r"\bphalanx_[a-z_]+", rules))
    assert len(named) >= 7, f"the rules name too few phalanx_* series: {sorted(named)}"
    assert named <= exported, f"rules name series the service does not export: {sorted(named - exported)}"
    # the label values the rules pick (shed and drop reasons) are ones the code sets
    source = "".join(p.read_text() for p in (MONITORING.parent).glob("*.py"))
    for reason in re.findall(r'reason="([a-z_]+)"', rules):
        assert f'labels("{reason}")' in source, f"no metric is ever labelled reason={reason!r}"


@needs_promtool
def test_the_exported_metrics_pass_promtools_naming_lint():
    service = _service_exposition()
    train = generate_latest(TrainMetrics(scenario="3m", model="m").registry).decode()
    for text in (service, train):
        done = _promtool("check", "metrics", stdin=text.encode())
        assert done.returncode == 0 and not done.stdout.strip(), done.stdout.decode() + done.stderr.decode()
