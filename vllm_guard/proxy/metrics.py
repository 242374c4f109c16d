"""The guard's Prometheus metrics, in a registry of its own.

Per-class children are bound once at start-up; queue depth and in-flight counts are read
from the admission core's `statistics()` at scrape time, so the request path never
touches a gauge.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from vllm_guard.config import CompiledConfig
from vllm_guard.core.admission import Admission
from vllm_guard.engine.state import EngineState
from vllm_guard.upstream.monitor import EngineMonitor

disable_created_metrics()  # the *_created series only add scrape weight


class Outcome(enum.StrEnum):
    """How a guarded request ended (the `outcome` label of vllm_guard_requests_total)."""

    OK = "ok"  # the engine answered (any status it chose)
    QUEUE_FULL = "queue_full"  # refused: the class's queue was full
    QUEUE_TIMEOUT = "queue_timeout"  # refused: waited max_wait_s without a slot
    SHUTTING_DOWN = "shutting_down"  # refused: waiting (or arriving) when a drain began
    QUOTA_STORE_DOWN = "quota_store_unavailable"  # refused: Redis down, on_store_down: reject
    WAITING_MEMORY_FULL = "waiting_memory_full"  # refused: max_waiting_body_bytes reached
    ENGINE_UNAVAILABLE = "engine_unavailable"
    UPSTREAM_ERROR = "upstream_error"  # connection lost or timed out after admission
    CLIENT_DISCONNECT = "client_disconnect"
    NOT_TAKEN = "not_taken"  # the engine never took it: sent to another (not counted)


class LimitAction(enum.StrEnum):
    """What a tenant limit did to a request (the `action` label of rate_limited_total)."""

    REJECTED = "rejected"
    DELAYED = "delayed"
    SHADOW = "shadow"  # shadow mode: would have been rejected or delayed, served at once


# LLM requests take from milliseconds (queue, first token) to minutes (long batch output).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class _StateCollector(Collector):
    """Queues and slots per class, and each engine's state (label `engine`: its address)."""

    def __init__(
        self,
        admission: Admission,
        engines: Sequence[EngineState],
        monitors: Sequence[EngineMonitor],
        labels: Sequence[str],
    ) -> None:
        self._admission = admission
        self._engines = engines
        self._monitors = monitors
        self._labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily(
            "vllm_guard_queue_depth", "Requests waiting in the guard for a slot.", labels=["class"]
        )
        in_flight = GaugeMetricFamily(
            "vllm_guard_in_flight",
            "Engine slots held by admitted, unfinished requests (one per sequence vLLM runs).",
            labels=["class"],
        )
        limit = GaugeMetricFamily(
            "vllm_guard_slot_limit",
            "Engine slots the class may fill (max_num_seqs minus more urgent reservations), "
            "on each engine.",
            labels=["class"],
        )
        for s in self._admission.statistics():
            depth.add_metric([s.name], s.queued)
            in_flight.add_metric([s.name], s.in_flight)
            limit.add_metric([s.name], s.slot_limit)
        yield from (depth, in_flight, limit)
        yield from self._engine_families()

    def _engine_families(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["engine", *labels])

        up = gauge("vllm_guard_engine_up", "1 while the engine takes requests.")
        restarts = gauge("vllm_guard_engine_restarts", "Times the launcher restarted the engine.")
        held = gauge(
            "vllm_guard_engine_in_flight",
            "Slots the guard's admitted requests hold on the engine (one per sequence).",
        )
        reserved = gauge(
            "vllm_guard_kv_reserved_tokens",
            "KV-cache tokens reserved by requests the guard admitted (prompt + completion "
            "budget each, until they end).",
        )
        capacity = gauge(
            "vllm_guard_kv_capacity_tokens", "The engine's KV-cache capacity in tokens."
        )
        stale = gauge(
            "vllm_guard_engine_metrics_stale",
            "1 while the engine's /metrics give no fresh KV reading (the guard then admits on "
            "its own accounting, or holds batch, as engine.on_stale says).",
        )
        usage = gauge(
            "vllm_guard_engine_kv_usage_ratio",
            "KV-cache usage the engine last reported (0-1), as the guard read it.",
        )
        requests = gauge(
            "vllm_guard_engine_requests",
            "Requests in the engine as it last reported them, by state.",
            "state",
        )
        preemptions = CounterMetricFamily(
            "vllm_guard_engine_preemptions",
            "Preemptions the engine reported (vllm:num_preemptions_total).",
            labels=["engine"],
        )
        for label, state, slots, monitor in zip(
            self._labels, self._engines, self._admission.engines, self._monitors, strict=True
        ):
            up.add_metric([label], 1.0 if state.ready else 0.0)
            restarts.add_metric([label], state.restarts)
            held.add_metric([label], slots.in_flight)
            reserved.add_metric([label], slots.kv.reserved)
            if slots.kv.capacity is not None:
                capacity.add_metric([label], slots.kv.capacity)
            stale.add_metric([label], 1.0 if monitor.stale else 0.0)
            sample = monitor.sample
            if sample is None:
                continue
            if sample.kv_usage is not None:
                usage.add_metric([label], sample.kv_usage)
            for name, value in (("running", sample.running), ("waiting", sample.waiting)):
                if value is not None:
                    requests.add_metric([label, name], value)
            if sample.preemptions is not None:
                preemptions.add_metric([label], sample.preemptions)
        yield from (up, restarts, held, reserved, capacity, stale, usage, requests, preemptions)


class _SchedulerPluginCollector(Collector):
    """The scheduler plugin's metrics (`vllm_guard_scheduler_preemptions_total`, recomputed
    tokens, first-step delays), which it writes to a file from vLLM's engine process: read
    at each scrape. No file (the plugin is not running, or not yet): no series."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def collect(self) -> Iterator[Metric]:
        try:
            text = self._path.read_text()
        except OSError:
            return
        yield from text_string_to_metric_families(text)


class _QuotaStoreCollector(Collector):
    """The shared quota store's health, read at each scrape."""

    def __init__(self, store: QuotaStoreHealth) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        store = self._store
        yield GaugeMetricFamily(
            "vllm_guard_quota_store_up",
            "1 while the shared quota store (Redis) answers; 0 while each class's "
            "on_store_down decides.",
            value=float(store.up),
        )
        yield CounterMetricFamily(
            "vllm_guard_quota_store_errors",
            "Calls to the quota store that failed or missed guard.quota_store_timeout_s.",
            value=store.failures,
        )
        yield GaugeMetricFamily(
            "vllm_guard_quota_store_pending_settles",
            "Settles (and refunds of unanswered reserves) kept until Redis answers again.",
            value=store.pending,
        )


class QuotaStoreHealth(Protocol):
    @property
    def up(self) -> bool: ...

    @property
    def failures(self) -> int: ...

    @property
    def pending(self) -> int: ...


class GuardMetrics:
    def __init__(
        self,
        config: CompiledConfig,
        admission: Admission,
        engines: Sequence[EngineState],
        monitors: Sequence[EngineMonitor],
        engine_labels: Sequence[str],
        registry: CollectorRegistry | None = None,
        scheduler_metrics_file: Path | None = None,
    ) -> None:
        """`scheduler_metrics_file`: where the scheduler plugin writes its metrics, shown
        here too (`serve` makes one per start; proxy mode: `engine.scheduler_metrics_file`)."""
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
            "Requests a tenant limit refused (action=rejected) or held back until the "
            "tenant's budget allowed them (action=delayed), by tenant and dimension.",
            ["tenant", "dimension", "action"],
            registry=self.registry,
        )
        self._tenant_requests_family = Counter(
            "vllm_guard_tenant_requests",
            "Generation requests by tenant (after authentication): the denominator of the "
            "rate-limit hit rate.",
            ["tenant"],
            registry=self.registry,
        )
        self._tenant_requests: dict[str, Any] = {}
        self._rate_limited_by: dict[tuple[str, str, str], Any] = {}
        self._tokens_by: dict[tuple[str, str], Any] = {}
        self.bind_tenants(config)
        reloads = Counter(
            "vllm_guard_config_reloads",
            "Config reloads (SIGHUP, vllm-guard reload) by result: ok, or failed (the file "
            "did not validate or changed what needs a restart; the old config stayed).",
            ["result"],
            registry=self.registry,
        )
        self._reloads = {result: reloads.labels(result) for result in ("ok", "failed")}
        self._last_reload_ok = Gauge(
            "vllm_guard_config_last_reload_successful",
            "1 when the last config reload (or the start) succeeded, 0 when it failed.",
            registry=self.registry,
        )
        self._last_reload_ok.set(1)
        names = [c.name for c in config.classes]
        self.outcome: dict[tuple[str, Outcome], Any] = {
            (name, outcome): requests.labels(name, outcome)
            for name in names
            for outcome in Outcome
            if outcome is not Outcome.NOT_TAKEN
        }
        self.queue_wait = {name: queue_wait.labels(name) for name in names}
        self._duration = {name: duration.labels(name) for name in names}
        self._ttft = {name: ttft.labels(name) for name in names}
        self.registry.register(_StateCollector(admission, engines, monitors, engine_labels))
        failovers = Counter(
            "vllm_guard_engine_failovers",
            "Requests an engine never took (connection refused or dropped before it answered "
            "anything) that the guard sent to another engine.",
            ["engine"],
            registry=self.registry,
        )
        self._failovers = [failovers.labels(label) for label in engine_labels]
        fallback = Counter(
            "vllm_guard_quota_store_fallback",
            "Requests decided by their class's on_store_down because the shared quota store "
            "could not be reached: served on this replica's share of the limit "
            "(posture=local) or refused with 503 (posture=reject).",
            ["class", "posture"],
            registry=self.registry,
        )
        self._fallback = {
            (name, posture): fallback.labels(name, posture)
            for name in names
            for posture in ("local", "reject")
        }
        plugin_file = scheduler_metrics_file or config.engine.scheduler_metrics_file
        if plugin_file is not None:
            self.registry.register(_SchedulerPluginCollector(Path(plugin_file)))

    def bind_tenants(self, config: CompiledConfig) -> None:
        """Every series the config's tenants can have, bound once and started at 0 (so
        rate() sees the first hit); at a reload, those of new tenants and limits (a removed
        tenant's stay: its requests under way still count)."""
        for name, tenant in config.tenants.items():
            if name not in self._tenant_requests:
                self._tenant_requests[name] = self._tenant_requests_family.labels(name)
            if tenant.limits is None:
                continue
            for dim in tenant.limits.dimensions():
                for action in LimitAction:
                    key = (name, dim, action)
                    if key not in self._rate_limited_by:
                        self._rate_limited_by[key] = self._rate_limited.labels(*key)
            for kind in ("charged", "used"):
                if (name, kind) not in self._tokens_by:
                    self._tokens_by[name, kind] = self._tokens.labels(name, kind)

    def reloaded(self, ok: bool) -> None:
        self._reloads["ok" if ok else "failed"].inc()
        self._last_reload_ok.set(1 if ok else 0)

    def failover(self, engine: int) -> None:
        self._failovers[engine].inc()

    def watch_quota_store(self, store: QuotaStoreHealth) -> None:
        self.registry.register(_QuotaStoreCollector(store))

    def store_fallback(self, class_name: str, posture: str) -> None:
        self._fallback[class_name, posture].inc()

    def count(self, class_name: str, outcome: Outcome) -> None:
        self.outcome[class_name, outcome].inc()

    def served(self, class_name: str, arrived: float, first_at: float | None, end: float) -> None:
        self._duration[class_name].observe(end - arrived)
        if first_at is not None:
            self._ttft[class_name].observe(first_at - arrived)

    def tokens(self, tenant: str, charged: int, used: int) -> None:
        self._tokens_by[tenant, "charged"].inc(charged)
        self._tokens_by[tenant, "used"].inc(used)

    def request(self, tenant: str) -> None:
        self._tenant_requests[tenant].inc()

    def rate_limited(
        self, tenant: str, dimension: str, action: LimitAction = LimitAction.REJECTED
    ) -> None:
        self._rate_limited_by[tenant, dimension, action].inc()


def render(registry: CollectorRegistry) -> tuple[bytes, bytes]:
    """The exposition text and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST.encode()
