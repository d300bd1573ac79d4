"""The service's Prometheus metrics, in one place.

Every name has the `phalanx_` prefix and a base unit (`_seconds`, `_total`); labels are the RPC
method, the gRPC status code and a shed reason, never a unit, game or episode. Pass your own
`CollectorRegistry` (tests do) or get the process-wide default.
"""

from __future__ import annotations

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RPCS = ("Act", "ActStream", "ActBatch", "GetModelInfo")
# Sub-millisecond resolution where a batched forward pass lives, out to seconds for overload.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.0075, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Every value the service gives these labels. Their series exist at 0 from the start: a series born at its first
# increment loses that increment to rate() and increase(), and so to the alerts (service/monitoring/alerts.yml).
ANSWER_CODES = ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL")
SHED_REASONS = ("queue_full", "deadline", "cancelled")
DROP_REASONS = ("no_game_id", "write_failed")


class ServiceMetrics:
    """The collectors, registered on `registry` (default: the global one)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = REGISTRY if registry is None else registry
        self.registry = r
        self.requests = Counter(
            "phalanx_requests_total", "Requests answered, by RPC and gRPC status code (per unit message on "
            "ActStream, per frame on ActBatch).", ["rpc", "code"], registry=r)
        self.units = Counter("phalanx_units_total", "Unit actions computed, by RPC.", ["rpc"], registry=r)
        self.request_latency = Histogram(
            "phalanx_request_latency_seconds", "Time from a request's arrival to its answer, by RPC.", ["rpc"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "phalanx_queue_time_seconds", "Time a request waited in the batcher's queue before its forward pass.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.compute_time = Histogram(
            "phalanx_compute_time_seconds", "Time of one batched forward pass (including stacking the inputs).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "phalanx_batch_size_units", "Rows (units) per forward pass.", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("phalanx_queue_depth_units", "Units waiting in the batcher's queue.", registry=r)
        self.shed = Counter(
            "phalanx_shed_requests_total", "Requests refused or dropped without a forward pass, by reason "
            "(queue_full; deadline: passed while queued; cancelled: the caller went away).", ["reason"], registry=r)
        self.model_version = Gauge("phalanx_model_version", "The model version being served (0: none).",
                                   registry=r)
        self.reloads = Counter("phalanx_model_reloads_total", "New model versions loaded and swapped in.",
                               registry=r)
        self.reload_failures = Counter(
            "phalanx_model_reload_failures_total", "Model versions refused (corrupt, incompatible, failed test "
            "forward); the previous version kept serving.", registry=r)
        self.versions_below_bar = Counter(
            "phalanx_model_versions_below_bar_total", "Model versions not served because their card's evaluation "
            "win rate is missing or below --min-eval-win-rate.", registry=r)
        # The experience log (service/experience.py; all zero while --experience-dir is off).
        self.experience_rows = Counter(
            "phalanx_experience_rows_total", "Unit-steps written to experience shard files.", registry=r)
        self.experience_shards = Counter(
            "phalanx_experience_shards_total", "Experience shard files written.", registry=r)
        self.experience_evictions = Counter(
            "phalanx_experience_evictions_total", "Units evicted from the experience log's open trajectories "
            "(the cap was reached; the stalest unit's waiting step was written as truncated).", registry=r)
        self.experience_truncated = Counter(
            "phalanx_experience_truncated_rows_total", "Steps written without their reward (truncated: evicted, "
            "or still waiting at shutdown).", registry=r)
        self.experience_dropped = Counter(
            "phalanx_experience_dropped_rows_total", "Served unit-steps not logged, by reason (no_game_id: the "
            "request had none; write_failed: the shard could not be written).", ["reason"], registry=r)
        self.experience_wait = Counter(
            "phalanx_experience_wait_seconds_total", "Time requests waited for the experience writer before being "
            "recorded (the disk that many chunks behind: backpressure instead of dropped steps).", registry=r)
        self.experience_open = Gauge(
            "phalanx_experience_open_trajectories", "Units whose last served step waits for its reward.", registry=r)
        for rpc in RPCS:
            for code in ANSWER_CODES:
                self.requests.labels(rpc, code)
        for reason in SHED_REASONS:
            self.shed.labels(reason)
        for reason in DROP_REASONS:
            self.experience_dropped.labels(reason)
        # Children bound once: `.labels()` on the hot path costs a dict lookup and a lock per call.
        self._latency = {rpc: self.request_latency.labels(rpc) for rpc in RPCS}
        self._ok = {rpc: self.requests.labels(rpc, grpc.StatusCode.OK.name) for rpc in RPCS}
        self._units = {rpc: self.units.labels(rpc) for rpc in RPCS}

    def answered(self, rpc: str, code: grpc.StatusCode, seconds: float, units: int = 0) -> None:
        """Count one answered request (OK or not) and its latency."""
        if code is grpc.StatusCode.OK:
            self._ok[rpc].inc()
        else:
            self.requests.labels(rpc, code.name).inc()
        self._latency[rpc].observe(seconds)
        if units:
            self._units[rpc].inc(units)


def start_metrics_server(port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None):
    """Serve /metrics on host:port in a background thread; returns (server, thread)."""
    return start_http_server(port, addr=host, registry=REGISTRY if registry is None else registry)
