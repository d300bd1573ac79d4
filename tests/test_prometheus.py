"""Against a real Prometheus and Pushgateway, as operators run them: the service's /metrics is scraped and the
trainer's batch-job metrics are pushed, then read back through Prometheus's query API.

The binaries are Debian's `prometheus` and `prometheus-pushgateway` (`.ci/run` installs them where it can use
apt-get as root); without them these tests are skipped with that reason.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.client import AsyncClient
from service.server import ServeConfig, start_server
from trainer.ppo import TrainConfig, train
from trainer.train_metrics import TrainMetrics

PROMETHEUS, PUSHGATEWAY = shutil.which("prometheus"), shutil.which("prometheus-pushgateway")
pytestmark = pytest.mark.skipif(not (PROMETHEUS and PUSHGATEWAY),
                                reason="needs prometheus and prometheus-pushgateway on PATH (.ci/run installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    return urllib.request.urlopen(url, timeout=5).read()


def _wait(what: str, ready, seconds: float = 30.0, step: float = 0.2):
    """Poll `ready()` until it returns something truthy (bounded in time); return that."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got = ready()
        except OSError:  # not listening yet
            got = None
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def monitoring(tmp_path):
    """A Pushgateway and a Prometheus scraping it and a service /metrics port (every second); yields
    (query(expr) -> {labels: value}, the port the service should serve /metrics on, the gateway's URL)."""
    gateway_port, prometheus_port, service_port = _free_port(), _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: phalanx-serve
    static_configs: [{{targets: ["127.0.0.1:{service_port}"]}}]
  - job_name: pushgateway
    honor_labels: true
    static_configs: [{{targets: ["127.0.0.1:{gateway_port}"]}}]
""")
    procs = [subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{gateway_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                               f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    base = f"http://127.0.0.1:{prometheus_port}"

    def query(expr: str) -> dict[tuple, float]:
        reply = json.loads(_get(f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"))
        assert reply["status"] == "success", reply
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in reply["data"]["result"]}

    try:
        _wait("Prometheus to be ready", lambda: _get(f"{base}/-/ready"))
        _wait("the Pushgateway to be ready", lambda: _get(f"http://127.0.0.1:{gateway_port}/-/ready"))
        yield query, service_port, f"http://127.0.0.1:{gateway_port}"
    finally:
        for proc in procs:  # by PID
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_prometheus_reads_the_service_and_the_trainer(service_repo, monitoring, tmp_path):
    query, service_port, gateway = monitoring
    root, scenario, _ = service_repo
    obs = np.zeros(scenario.obs_size, np.float32)
    mask = np.zeros(scenario.n_actions, bool)
    mask[1:6] = True

    async def serve_some_requests():
        config = ServeConfig(models=root, name="m", port=0, poll_seconds=0.0, metrics_port=service_port)
        running = await start_server(config, CollectorRegistry())
        try:
            async with AsyncClient(running.address, retries=0) as client:
                for unit in range(20):
                    await client.act(obs, mask, unit % scenario.n_agents, greedy=True)
                with pytest.raises(Exception):
                    await client.act(obs[:-1], mask, 0)  # INVALID_ARGUMENT, counted under its code
                # held open until Prometheus has scraped what these requests left
                await asyncio.to_thread(_wait, "Prometheus to scrape all 21 Acts", lambda: query(
                    'sum(phalanx_requests_total{job="phalanx-serve", rpc="Act"}) >= 21'))
                # read while the service still runs: once it stops, Prometheus marks its series stale
                return {what: list(query(expr).values()) for what, expr in (
                    ("answered", 'phalanx_requests_total{job="phalanx-serve", rpc="Act", code="OK"}'),
                    ("invalid", 'phalanx_requests_total{rpc="Act", code="INVALID_ARGUMENT"}'),
                    ("up", 'up{job="phalanx-serve"}'),  # 1: the last scrape parsed without an error
                    ("version", 'phalanx_model_version{job="phalanx-serve"}'),
                    ("latency", 'phalanx_request_latency_seconds_count{job="phalanx-serve", rpc="Act"}'))}
        finally:
            await running.stop(grace=1)

    got = asyncio.run(serve_some_requests())
    assert got["answered"] == [20.0] and got["invalid"] == [1.0] and got["up"] == [1.0] and got["version"] == [1.0]
    assert sum(got["latency"]) == 21.0  # a histogram Prometheus took as one: every answered call observed once

    # a training run as a batch job: its metrics pushed at each evaluation, scraped from the gateway
    metrics = TrainMetrics(scenario="3m", model="pushed", registry=CollectorRegistry(), pushgateway=gateway)
    cfg = TrainConfig(models=str(tmp_path / "models"), name="pushed", envs=32, rollout=8, hidden=16, epochs=2,
                      steps=768, eval_every=512, eval_episodes=16, progress=False)
    summary = train(cfg, metrics=metrics).summary
    assert metrics.push_failures == 0
    steps = _wait("Prometheus to scrape the pushed training metrics", lambda: query(
        'phalanx_train_steps{job="phalanx_train", model="pushed", scenario="3m"} == 768'))
    assert list(steps.values()) == [768.0]
    version = query('phalanx_train_model_version{job="phalanx_train", model="pushed"}')
    assert list(version.values()) == [float(summary["version"])]
    assert list(query('up{job="pushgateway"}').values()) == [1.0]
