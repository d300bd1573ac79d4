"""Prometheus metrics of a training run: an endpoint while it runs, the Pushgateway for batch jobs.

`TrainMetrics(registry=CollectorRegistry(), labels={...})` owns its registry, so tests read exactly what one
run reported. Every metric is named `phalanx_train_*` and carries the labels `scenario` and `model`.
Pushing never fails a run: errors are logged (and counted in `push_failures`).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, start_http_server

log = logging.getLogger(__name__)

_LABELS = ("scenario", "model")


class TrainMetrics:
    """The phalanx_train_* gauges for one run. `scenario` and `model` become labels on every metric."""

    def __init__(self, *, scenario: str, model: str, registry: CollectorRegistry | None = None,
                 pushgateway: str | None = None, job: str = "phalanx_train"):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.pushgateway, self.job = pushgateway, job
        self.labels = {"scenario": scenario, "model": model}
        self.push_failures = 0
        self._server = None

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"phalanx_train_{name}", doc, _LABELS, registry=self.registry).labels(**self.labels)

        self.steps = gauge("steps", "Environment steps taken so far (all games, all ranks).")
        self.samples = gauge("samples", "Live-unit samples learned from so far.")
        self.agent_steps_per_second = gauge("agent_steps_per_second",
                                            "Training throughput: unit steps per second, the update included.")
        self.train_win_rate = gauge("train_win_rate", "Win rate of the (sampling) training games since the last evaluation.")
        self.train_return = gauge("train_episode_return", "Mean return of the training games since the last evaluation.")
        self.eval_win_rate = gauge("eval_win_rate", "Greedy win rate at the last evaluation.")
        self.eval_return = gauge("eval_episode_return", "Greedy mean episode return at the last evaluation.")
        self.policy_loss = gauge("policy_loss", "Clipped surrogate policy loss (last iteration's mean).")
        self.value_loss = gauge("value_loss", "Clipped value loss in normalised units (last iteration's mean).")
        self.entropy = gauge("entropy", "Mean policy entropy over live units (nats).")
        self.approx_kl = gauge("approx_kl", "Approximate KL between the collecting and the updated policy.")
        self.clip_fraction = gauge("clip_fraction", "Fraction of samples whose ratio was clipped.")
        self.learning_rate = gauge("learning_rate", "Current learning rate.")
        self.model_version = gauge("model_version", "Newest model version written by this run (0: none yet).")
        # Not measured yet reads NaN, not 0: a win rate of 0 before the first evaluation would look like a
        # result on a dashboard. (NaN is a sample all the same: an avg() over runs is NaN until each evaluated.)
        for unknown in (self.train_win_rate, self.train_return, self.eval_win_rate, self.eval_return,
                        self.policy_loss, self.value_loss, self.entropy, self.approx_kl, self.clip_fraction):
            unknown.set(float("nan"))

    # --- exposure ---------------------------------------------------------------------------------------
    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP in a background thread; returns the bound port (port 0: any free one)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def push(self) -> bool:
        """Push every metric to the Pushgateway (if one is set); log and count a failure, never raise."""
        if not self.pushgateway:
            return False
        try:
            push_to_gateway(self.pushgateway, job=self.job, registry=self.registry,
                            grouping_key={"model": self.labels["model"], "scenario": self.labels["scenario"]},
                            timeout=5)
            return True
        except Exception as e:  # noqa: BLE001 - a monitoring outage must never stop training
            self.push_failures += 1
            log.warning("pushing metrics to %s failed: %s", self.pushgateway, e)
            return False

    # --- updates --------------------------------------------------------------------------------------
    def update_iteration(self, *, steps: int, samples: int, agent_steps_per_s: float, train_win_rate: float | None,
                         train_return: float | None, lr: float, pg_loss: float = 0.0, v_loss: float = 0.0,
                         entropy: float = 0.0, approx_kl: float = 0.0, clipfrac: float = 0.0) -> None:
        self.steps.set(steps)
        self.samples.set(samples)
        self.agent_steps_per_second.set(agent_steps_per_s)
        if train_win_rate is not None:
            self.train_win_rate.set(train_win_rate)
        if train_return is not None:
            self.train_return.set(train_return)
        self.learning_rate.set(lr)
        self.policy_loss.set(pg_loss)
        self.value_loss.set(v_loss)
        self.entropy.set(entropy)
        self.approx_kl.set(approx_kl)
        self.clip_fraction.set(clipfrac)

    def update_eval(self, *, win_rate: float, mean_return: float, version: int | None) -> None:
        self.eval_win_rate.set(win_rate)
        self.eval_return.set(mean_return)
        if version is not None:
            self.model_version.set(version)
