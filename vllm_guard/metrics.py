"""The guard's Prometheus metrics, in a registry of its own.

Per-class children are bound once at start-up; queue depth and in-flight counts are read
from the admission core's `statistics()` at scrape time, so the request path never
touches a gauge.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vllm_guard.admission import Admission
from vllm_guard.config import CompiledConfig
from vllm_guard.engine import EngineState

disable_created_metrics()  # the *_created series only add scrape weight

OUTCOMES = (
    "ok",  # the engine answered (any status it chose)
    "queue_full",  # refused: the class's queue was full
    "queue_timeout",  # refused: waited max_wait_s without a slot
    "engine_unavailable",
    "upstream_error",  # connection lost or timed out after admission
    "client_disconnect",
)

# LLM requests take from milliseconds (queue, first token) to minutes (long batch output).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class _StateCollector(Collector):
    def __init__(self, admission: Admission, engine: EngineState) -> None:
        self._admission = admission
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "vllm_guard_queue_depth", "Requests waiting in the guard for a slot.", labels=["class"]
        )
        in_flight = GaugeMetricFamily(
            "vllm_guard_in_flight", "Requests admitted and not yet finished.", labels=["class"]
        )
        limit = GaugeMetricFamily(
            "vllm_guard_slot_limit",
            "Engine slots the class may fill (max_num_seqs minus more urgent reservations).",
            labels=["class"],
        )
        for s in self._admission.statistics():
            depth.add_metric([s.name], s.queued)
            in_flight.add_metric([s.name], s.in_flight)
            limit.add_metric([s.name], s.slot_limit)
        up = GaugeMetricFamily("vllm_guard_engine_up", "1 while the engine takes requests.")
        up.add_metric([], 1.0 if self._engine.ready else 0.0)
        restarts = GaugeMetricFamily(
            "vllm_guard_engine_restarts", "Times the launcher restarted the engine."
        )
        restarts.add_metric([], self._engine.restarts)
        yield from (depth, in_flight, limit, up, restarts)


class GuardMetrics:
    def __init__(
        self,
        config: CompiledConfig,
        admission: Admission,
        engine: EngineState,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        requests = Counter(
            "vllm_guard_requests",
            "Guarded requests by class and how they ended.",
            ["class", "outcome"],
            registry=self.registry,
        )
        queue_wait = Histogram(
            "vllm_guard_queue_wait_seconds",
            "Time admitted requests waited in the guard for a slot.",
            ["class"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        duration = Histogram(
            "vllm_guard_request_duration_seconds",
            "End-to-end latency of requests vLLM answered, from the guard having the request "
            "to the end of the response, queue waits included.",
            ["class"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        ttft = Histogram(
            "vllm_guard_time_to_first_token_seconds",
            "Streaming requests: from the guard having the request to the first streamed "
            "bytes sent to the client, queue waits included.",
            ["class"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._tokens = Counter(
            "vllm_guard_tenant_tokens",
            "Tokens of limited tenants: charged up front (estimate) and used (settled).",
            ["tenant", "kind"],
            registry=self.registry,
        )
        self._rate_limited = Counter(
            "vllm_guard_rate_limited",
            "Requests refused by a tenant limit, by tenant and dimension.",
            ["tenant", "dimension"],
            registry=self.registry,
        )
        names = [c.name for c in config.classes]
        self.outcome = {
            (name, outcome): requests.labels(name, outcome)
            for name in names
            for outcome in OUTCOMES
        }
        self.queue_wait = {name: queue_wait.labels(name) for name in names}
        self._duration = {name: duration.labels(name) for name in names}
        self._ttft = {name: ttft.labels(name) for name in names}
        self.registry.register(_StateCollector(admission, engine))

    def count(self, class_name: str, outcome: str) -> None:
        self.outcome[class_name, outcome].inc()

    def served(self, class_name: str, arrived: float, first_at: float | None, end: float) -> None:
        self._duration[class_name].observe(end - arrived)
        if first_at is not None:
            self._ttft[class_name].observe(first_at - arrived)

    def tokens(self, tenant: str, charged: int, used: int) -> None:
        self._tokens.labels(tenant, "charged").inc(charged)
        self._tokens.labels(tenant, "used").inc(used)

    def rate_limited(self, tenant: str, dimension: str) -> None:
        self._rate_limited.labels(tenant, dimension).inc()


def render(registry: CollectorRegistry) -> tuple[bytes, bytes]:
    """The exposition text and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST.encode()
