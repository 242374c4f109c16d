"""The guard: a pure ASGI app in front of vLLM's OpenAI-compatible server.

It builds the request path's parts once (admission and quota gates, the engine monitor,
metrics) and routes: the generation endpoints go through `generation.Generation` (auth ->
class -> body -> quota -> admission -> forward -> settle); `/health` and `/metrics` are the
guard's own (no auth); `GET /v1/models` passes through after auth; everything else, vLLM's
admin and tokenizer paths included, is 404 — the guard exposes only what it guards.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from vllm_guard.config import CompiledConfig, ConfigError, reload_config
from vllm_guard.core.admission import Admission
from vllm_guard.core.classes import Tenant
from vllm_guard.core.quota import TenantQuota
from vllm_guard.engine.state import EngineState
from vllm_guard.limits.redis_store import RedisQuotaStore
from vllm_guard.limits.shared_gate import SharedQuotaGate
from vllm_guard.proxy import responses
from vllm_guard.proxy.admission_gate import Gate
from vllm_guard.proxy.clock import Clock, LoopClock
from vllm_guard.proxy.generation import Generation
from vllm_guard.proxy.metrics import GuardMetrics, LimitAction, render
from vllm_guard.proxy.quota_gate import QuotaGate, TenantGate
from vllm_guard.proxy.shadow import ShadowGate
from vllm_guard.upstream.connections import (
    Upstream,
)
from vllm_guard.upstream.monitor import EngineMonitor, EngineSample

log = logging.getLogger("vllm_guard.proxy.app")

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_QUEUE_HEADER = b"x-vllm-guard-queue-ms"
_QUOTA_HEADER = b"x-vllm-guard-quota-ms"  # estimate + waiting for the tenant's budget
_CLASS_HEADER_OUT = b"x-vllm-guard-class"
_EVENT_STREAM = b"text/event-stream"

Scope = dict[str, Any]


class GuardApp:
    def __init__(
        self,
        config: CompiledConfig,
        upstream: Upstream | Sequence[Upstream],
        engine: EngineState | Sequence[EngineState],
        admission: Admission | None = None,
        clock: Clock | None = None,
        scheduler_metrics_file: Path | None = None,
        metrics_port: int | None = None,
    ) -> None:
        """`clock`: "now" and the waiters' timers (the event loop's unless a test injects
        a manual one); `scheduler_metrics_file`: the scheduler plugin's metrics (serve);
        `metrics_port`: the port that alone serves /metrics and /metrics/engine (None: the
        public one does). Several `upstream`s, each with its `engine` state: engines serving
        the same model, each with `engine.max_num_seqs` slots (see core/admission.py)."""
        self.metrics_port = metrics_port
        self.clock = clock or LoopClock()
        self.config = config
        self.upstreams = [upstream] if isinstance(upstream, Upstream) else list(upstream)
        self.engines = [engine] if isinstance(engine, EngineState) else list(engine)
        assert len(self.upstreams) == len(self.engines) >= 1
        self.upstream = self.upstreams[0]
        eng = config.engine
        self.admission = admission or Admission(
            config.max_num_seqs,
            config.classes,
            eng.kv_capacity_tokens if eng.kv_admission else None,
            engines=len(self.engines),
            affinity_slack=eng.affinity_slack,
        )
        self.gate = Gate(self.admission, self.clock, config.guard.unavailable_retry_after_s)
        several = len(self.engines) > 1
        labels = [u.label for u in self.upstreams]
        self.monitors = []
        for i, (up, state) in enumerate(zip(self.upstreams, self.engines, strict=True)):
            self.monitors.append(
                EngineMonitor(
                    up.base_url,
                    functools.partial(self.engine_sample, engine=i),
                    eng.metrics_interval_s,
                    eng.metrics_stale_after_s,
                    up.headers([], False),
                    "admitting only the most urgent class"
                    if eng.holds_batch_when_stale
                    else "admitting on the guard's own KV accounting",
                )
            )
            if several:  # one engine: its state answers requests; several: a rotation
                state.name = f"engine {i} ({up.label})"
                state.on_ready = functools.partial(self._engine_ready, i)
                self.admission.set_up(i, state.ready)
        self.monitor = self.monitors[0]
        self._monitor_tasks: list[asyncio.Task[None]] = []
        self._store_task: asyncio.Task[None] | None = None
        self.metrics = GuardMetrics(
            config,
            self.admission,
            self.engines,
            self.monitors,
            labels,
            scheduler_metrics_file=scheduler_metrics_file,
        )
        self.quota_store = _quota_store(config)
        if self.quota_store is not None:
            self.metrics.watch_quota_store(self.quota_store)
        # Every tenant gate ever built, by tenant: a reload keeps a tenant's buckets (and a
        # removed tenant's, should it come back); `quota_gates` has the configured ones.
        self._gates: dict[str, TenantGate] = {}
        self.quota_gates = self._tenant_gates(config)
        self._unavailable_headers = [
            (b"retry-after", str(config.guard.unavailable_retry_after_s).encode())
        ]
        self.generation = Generation(
            config,
            self.engines,
            self.upstreams,
            self.admission,
            self.gate,
            self.quota_gates,
            self.metrics,
            self.monitor,
            self.clock,
        )
        self.engine = self.generation.engine  # ready while some engine is

    # -- reload ---------------------------------------------------------------------------

    def reload(self, env: Mapping[str, str] | None = None) -> CompiledConfig:
        """Read the config file again and apply it (SIGHUP, `vllm-guard reload`): the new
        rules for new requests, class limits recomputed, tenants' buckets kept and clipped
        to changed limits; requests under way finish under the rules they arrived with.
        Raises `ConfigError` and changes nothing when the file does not validate or changes
        what needs a restart (`config.restart_only_changes`). Synchronous: nothing else runs on the
        event loop between the first change and the last. `env`: for `env:` keys (this
        process's environment, fixed at its start)."""
        try:
            config = reload_config(self.config, os.environ if env is None else env)
        except ConfigError:
            self.metrics.reloaded(False)
            raise
        self.metrics.bind_tenants(config)
        self.quota_gates = self._tenant_gates(config)
        self.gate.reconfigure(config.classes)
        self.generation.use(config, self.quota_gates)
        self.config = config
        self.metrics.reloaded(True)
        return config

    # -- ASGI entry ---------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            method = scope["method"]
            if self.metrics_port is not None:  # metrics on a port of their own
                server = scope.get("server")
                if server is not None and server[1] == self.metrics_port:
                    return await self._metrics_only(path, send)
                if path.startswith("/metrics"):
                    return await responses.NOT_FOUND.send(send)
            if path in GENERATION_PATHS:
                if method != "POST":
                    return await responses.METHOD_NOT_ALLOWED.send(send)
                return await self.generation.handle(scope, receive, send, path)
            if path == "/v1/models" and method == "GET":
                return await self._models(scope, send)
            if path == "/health":
                return await self._health(send)
            if path.startswith("/metrics"):
                return await self._metrics_only(path, send)
            return await responses.NOT_FOUND.send(send)
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        return None

    async def _metrics_only(self, path: str, send: Any) -> None:
        """`/metrics` (the guard's) and `/metrics/engine` (vLLM's, as last read)."""
        if path == "/metrics":
            body, content_type = render(self.metrics.registry)
            return await responses.send_body(send, 200, body, content_type)
        if path == "/metrics/engine":
            return await self._engine_metrics(send, 0)
        if path.startswith("/metrics/engine/") and path[16:].isdigit():
            return await self._engine_metrics(send, int(path[16:]))
        if path == "/health":
            return await self._health(send)
        return await responses.NOT_FOUND.send(send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._monitor_tasks = [asyncio.create_task(m.run()) for m in self.monitors]
                if self.quota_store is not None:
                    self._store_task = asyncio.create_task(self.quota_store.run())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in self._monitor_tasks:
                    task.cancel()
                if self._store_task is not None:
                    self._store_task.cancel()
                if self.quota_store is not None:
                    await self.quota_store.close()
                for up in self.upstreams:
                    await up.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- the engine's state ---------------------------------------------------------------

    def drain(self) -> None:
        """The server stops: requests waiting (for a slot or for their tenant's budget)
        get 503 shutting_down now, and so do new ones; admitted ones run on."""
        self.gate.drain()
        for quota_gate in self._gates.values():  # a removed tenant's may still have waiters
            quota_gate.drain()

    def engine_sample(self, sample: EngineSample | None, engine: int = 0) -> None:
        """A monitor's listener, after every poll: None when the reading is stale."""
        eng = self.config.engine
        capacity = None
        if eng.kv_admission:
            capacity = eng.kv_capacity_tokens or (sample.kv_capacity_tokens if sample else None)
        hold = sample is None and eng.holds_batch_when_stale
        live = sample.kv_used_tokens if sample is not None else None
        self.gate.wake(self.admission.engine_update(live, capacity, hold, engine))

    def _engine_ready(self, engine: int, ready: bool) -> None:
        """An engine went out of rotation (down, hung, refusing) or came back."""
        self.gate.wake(self.admission.set_up(engine, ready))

    def _tenant_gates(self, config: CompiledConfig) -> dict[str, TenantGate]:
        """The gate of each tenant with limits: the one it had (limits and posture updated
        in place), or a new one; wrapped in a `ShadowGate` for tenants in shadow mode."""
        gates: dict[str, TenantGate] = {}
        for name, tenant in config.tenants.items():
            limits = tenant.limits
            if limits is None:
                continue
            gate = self._gates.get(name)
            if gate is None:
                gate = self._gates[name] = self._quota_gate(tenant)
            else:
                gate.reconfigure(limits, tenant.priority_class.on_store_down)
            if tenant.shadow:
                c = tenant.priority_class
                on_shadow = self._shadowed_by(name)
                gate = ShadowGate(gate, on_shadow, c.max_wait_s if c.wait_on_limit else 0.0)
            gates[name] = gate
        return gates

    def _quota_gate(self, tenant: Tenant) -> TenantGate:
        assert tenant.limits is not None
        delayed = self._delayed_by(tenant.name)
        if self.quota_store is None:
            # Buckets start full; the first refill (on the loop's clock) caps them.
            return QuotaGate(TenantQuota(tenant.limits, 0.0), delayed, self.clock)
        name = tenant.name
        return SharedQuotaGate(
            self.quota_store,
            name,
            tenant.limits,
            tenant.priority_class.on_store_down,  # type: ignore[arg-type]
            self.config.guard.replicas,
            delayed,
            lambda posture: self.metrics.store_fallback(self._class_of(name), posture),
            self.clock,
        )

    def _class_of(self, tenant: str) -> str:
        """The tenant's class now (a removed tenant's last one is not known: the first)."""
        t = self.config.tenants.get(tenant)
        return (t.priority_class if t is not None else self.config.classes[0]).name

    def _delayed_by(self, tenant: str) -> Any:
        return lambda dimension: self.metrics.rate_limited(tenant, dimension, LimitAction.DELAYED)

    def _shadowed_by(self, tenant: str) -> Any:
        return lambda dimension: self.metrics.rate_limited(tenant, dimension, LimitAction.SHADOW)

    # -- simple paths -------------------------------------------------------------------

    async def _health(self, send: Any) -> None:
        body = json.dumps({"status": "ok" if self.engine.ready else self.engine.phase}).encode()
        if self.engine.ready:
            await responses.send_json(send, 200, body)
        else:
            await responses.send_json(send, 503, body, self._unavailable_headers)

    async def _engine_metrics(self, send: Any, engine: int) -> None:
        """vLLM's own /metrics as the guard last read them (vLLM's port is private under
        `serve`), so one Prometheus job on the guard sees both: `/metrics/engine` for the
        first engine, `/metrics/engine/N` for engine N where there are several."""
        if engine >= len(self.monitors):
            return await responses.NOT_FOUND.send(send)
        text = self.monitors[engine].text
        if text is None:
            return await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)
        await responses.send_body(send, 200, text, b"text/plain; version=0.0.4; charset=utf-8")

    async def _models(self, scope: Scope, send: Any) -> None:
        headers = dict(scope["headers"])
        if self.generation.rules.auth.tenant_for(headers.get(b"authorization")) is None:
            return await responses.UNAUTHORIZED.send(send)
        if not self.engine.ready:
            return await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)
        try:
            upstream = self.generation.ready_upstream()
            async with upstream.session.get(
                upstream.base_url + "/v1/models", headers=upstream.headers([], False)
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            return await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)
        await responses.send_json(send, status, body)

    # -- generation ---------------------------------------------------------------------


def _quota_store(config: CompiledConfig) -> RedisQuotaStore | None:
    """The shared quota store `guard.quota_store` names; None for `memory`."""
    guard = config.guard
    if guard.quota_store == "memory":
        return None
    return RedisQuotaStore(
        guard.quota_store,
        password=config.quota_store_password,
        ca_file=guard.quota_store_ca_file,
        timeout_s=guard.quota_store_timeout_s,
        lease_s=guard.quota_store_lease_s,
    )
