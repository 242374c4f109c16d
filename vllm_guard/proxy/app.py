"""The guard: a pure ASGI app in front of vLLM's OpenAI-compatible server.

Request path for the generation endpoints (see DESIGN.md):
auth -> class -> engine up? -> body (size, JSON, fields) -> tenant quota (estimate,
reserve on every dimension or 429) -> admission (queue) -> forward with the class's
`priority` -> stream back -> release the slot -> settle the quota with the real usage.

Every path out of `_guarded` releases what the request holds: the slot is returned and
the quota settled in `finally`s, a queued request leaves its queue when its task is
cancelled, and a client that disconnects cancels the task, which closes the upstream
connection so vLLM aborts the request and frees its KV cache.

Other paths: `/health` and `/metrics` are the guard's own (no auth); `GET /v1/models`
passes through after auth; everything else, vLLM's admin and tokenizer paths included,
is 404 — the guard exposes only what it guards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import aiohttp

from vllm_guard.config import CompiledConfig
from vllm_guard.core.admission import Admission
from vllm_guard.core.classes import PriorityClass, Tenant
from vllm_guard.core.cost import (
    HEURISTIC_BYTES_PER_TOKEN,
    Estimate,
    completion_budget,
    estimate,
    prompt_token_bound,
    tokenize_request,
)
from vllm_guard.core.quota import Denied, QuotaStore, Reservation, TenantQuota, go_duration
from vllm_guard.engine.state import EngineState
from vllm_guard.proxy import responses
from vllm_guard.proxy.admission_gate import Gate, RefusalReason, Refused, retry_after_header
from vllm_guard.proxy.auth import Authenticator
from vllm_guard.proxy.body import ParsedRequest, dump, parse_request
from vllm_guard.proxy.classify import CLASS_HEADER, clamp_priority, resolve_class
from vllm_guard.proxy.clock import Clock, LoopClock
from vllm_guard.proxy.metrics import GuardMetrics, LimitAction, Outcome, render
from vllm_guard.proxy.quota_gate import QuotaGate
from vllm_guard.proxy.usage import UsageTap, usage_total
from vllm_guard.upstream.connections import (
    FORWARDED_REQUEST_HEADERS,
    FORWARDED_RESPONSE_HEADERS,
    Upstream,
)
from vllm_guard.upstream.h1client import UpstreamConnectError
from vllm_guard.upstream.monitor import EngineMonitor, EngineSample

log = logging.getLogger("vllm_guard.proxy.app")

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_QUEUE_HEADER = b"x-vllm-guard-queue-ms"
_QUOTA_HEADER = b"x-vllm-guard-quota-ms"  # estimate + waiting for the tenant's budget
_CLASS_HEADER_OUT = b"x-vllm-guard-class"
_EVENT_STREAM = b"text/event-stream"

Scope = dict[str, Any]


class _ClientWatch:
    """Per-request state shared with the disconnect watcher."""

    __slots__ = ("finished", "gone")

    def __init__(self) -> None:
        self.gone = False
        self.finished = False


class _Usage:
    """What `_forward` learned about the request's real cost, for settling its quota.

    Charged when vLLM gave no usage: a stream that was cut off pays its prompt plus one
    token per content event streamed; a request vLLM may have worked on without saying
    how much (no answer, a client that left before a non-streaming answer) pays its whole
    estimate, so leaving early never buys free compute; an error status from vLLM pays no
    tokens (it refused before generating) but still counts as a request."""

    __slots__ = (
        "arrived", "events", "first_at", "sent", "status", "total", "waiting_bytes",
        "wants_usage",
    )  # fmt: skip

    def __init__(self, wants_usage: bool, arrived: float) -> None:
        self.wants_usage = wants_usage  # the client asked for the stream's usage chunk
        self.arrived = arrived  # loop time the guard had the whole request
        self.first_at: float | None = None  # loop time the first streamed bytes went out
        self.sent = False  # handed to vLLM (it may have worked on it)
        self.status = 0
        self.total: int | None = None  # usage.total_tokens, when vLLM reported it
        self.events = 0  # content events streamed
        self.waiting_bytes = 0  # body bytes counted against guard.max_waiting_body_bytes

    def used_tokens(self, est: Estimate, stream: bool) -> int:
        if self.total is not None:
            return self.total
        if self.status == 200 and stream:
            return est.prompt_tokens + self.events
        if self.status in (0, 200):
            return est.total
        return 0


class GuardApp:
    def __init__(
        self,
        config: CompiledConfig,
        upstream: Upstream,
        engine: EngineState,
        admission: Admission | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`clock`: "now" and the waiters' timers (the event loop's unless a test injects
        a manual one)."""
        self.clock = clock or LoopClock()
        self.config = config
        self.upstream = upstream
        self.engine = engine
        eng = config.engine
        self.admission = admission or Admission(
            config.max_num_seqs,
            config.classes,
            eng.kv_capacity_tokens if eng.kv_admission else None,
        )
        self.gate = Gate(self.admission, self.clock)
        self.auth = Authenticator(config.key_digests, config.anonymous)
        self.monitor = EngineMonitor(
            upstream.base_url,
            self.engine_sample,
            eng.metrics_interval_s,
            eng.metrics_stale_after_s,
            upstream.headers([], False),
            "admitting only the most urgent class"
            if eng.holds_batch_when_stale
            else "admitting on the guard's own KV accounting",
        )
        self._monitor_task: asyncio.Task[None] | None = None
        self.metrics = GuardMetrics(config, self.admission, engine, self.monitor)
        # Buckets start full; the first refill (on the loop's clock) caps them at capacity.
        self.quota_gates = {
            name: QuotaGate(TenantQuota(t.limits, 0.0), self._delayed_by(name), self.clock)
            for name, t in config.tenants.items()
            if t.limits is not None
        }
        self._unavailable_headers = [
            (b"retry-after", str(config.guard.unavailable_retry_after_s).encode())
        ]
        self._too_large = responses.body_too_large(config.guard.max_body_bytes)
        self._waiting_bytes = 0  # bodies of requests not yet admitted (quota or queue)

    # -- ASGI entry ---------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            method = scope["method"]
            if path in GENERATION_PATHS:
                if method != "POST":
                    return await responses.METHOD_NOT_ALLOWED.send(send)
                return await self._guarded(scope, receive, send, path)
            if path == "/v1/models" and method == "GET":
                return await self._models(scope, send)
            if path == "/health":
                return await self._health(send)
            if path == "/metrics":
                body, content_type = render(self.metrics.registry)
                return await responses.send_body(send, 200, body, content_type)
            if path == "/metrics/engine":
                return await self._engine_metrics(send)
            return await responses.NOT_FOUND.send(send)
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        return None

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._monitor_task = asyncio.create_task(self.monitor.run())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._monitor_task is not None:
                    self._monitor_task.cancel()
                await self.upstream.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- the engine's state ---------------------------------------------------------------

    def engine_sample(self, sample: EngineSample | None) -> None:
        """The monitor's listener, after every poll: None when the reading is stale."""
        eng = self.config.engine
        capacity = None
        if eng.kv_admission:
            capacity = eng.kv_capacity_tokens or (sample.kv_capacity_tokens if sample else None)
        hold = sample is None and eng.holds_batch_when_stale
        live = sample.kv_used_tokens if sample is not None else None
        self.gate.wake(self.admission.engine_update(live, capacity, hold))

    def _delayed_by(self, tenant: str) -> Any:
        return lambda dimension: self.metrics.rate_limited(tenant, dimension, LimitAction.DELAYED)

    # -- simple paths -------------------------------------------------------------------

    async def _health(self, send: Any) -> None:
        body = json.dumps({"status": "ok" if self.engine.ready else self.engine.phase}).encode()
        if self.engine.ready:
            await responses.send_json(send, 200, body)
        else:
            await responses.send_json(send, 503, body, self._unavailable_headers)

    async def _engine_metrics(self, send: Any) -> None:
        """vLLM's own /metrics as the guard last read them (vLLM's port is private under
        `serve`), so one Prometheus job on the guard sees both."""
        text = self.monitor.text
        if text is None:
            return await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)
        await responses.send_body(send, 200, text, b"text/plain; version=0.0.4; charset=utf-8")

    async def _models(self, scope: Scope, send: Any) -> None:
        headers = dict(scope["headers"])
        if self.auth.tenant_for(headers.get(b"authorization")) is None:
            return await responses.UNAUTHORIZED.send(send)
        if not self.engine.ready:
            return await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)
        try:
            async with self.upstream.session.get(
                self.upstream.base_url + "/v1/models", headers=self.upstream.headers([], False)
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            return await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)
        await responses.send_json(send, status, body)

    # -- generation ---------------------------------------------------------------------

    async def _guarded(self, scope: Scope, receive: Any, send: Any, path: str) -> None:
        authorization = class_header = content_length = None
        forwarded: list[tuple[bytes, bytes]] = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is not None:
                    return await _SEVERAL_AUTHORIZATIONS.send(send)
                authorization = value
            elif name == CLASS_HEADER:
                class_header = value
            elif name == b"content-length":
                content_length = value
            elif name in FORWARDED_REQUEST_HEADERS:
                forwarded.append((name, value))

        tenant = self.auth.tenant_for(authorization)
        if tenant is None:
            return await responses.UNAUTHORIZED.send(send)
        self.metrics.request(tenant.name)
        priority_class = resolve_class(tenant, class_header, self.config.classes_by_name)
        if isinstance(priority_class, responses.ErrorResponse):
            return await priority_class.send(send)
        if not self.engine.ready:
            self.metrics.count(priority_class.name, Outcome.ENGINE_UNAVAILABLE)
            return await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)

        limit = self.config.guard.max_body_bytes
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            return await self._too_large.send(send)
        raw = await _read_body(receive, limit)
        if raw is None:
            return None  # client left while sending its body
        if raw is _TOO_LARGE:
            return await self._too_large.send(send)
        assert isinstance(raw, bytes)
        request = parse_request(raw, path)
        if isinstance(request, responses.ErrorResponse):
            return await request.send(send)
        payload, stream = request.payload, request.stream
        priority = clamp_priority(payload.get("priority"), priority_class)
        if isinstance(priority, responses.ErrorResponse):
            return await priority.send(send)
        payload["priority"] = priority
        max_seqs = self.admission.max_seqs(priority_class)
        if request.sequences > max_seqs:
            return await _too_many_sequences(request, priority_class, max_seqs).send(send)
        usage = _Usage(_asked_for_usage(payload), self.clock.now())

        quota = self.quota_gates.get(tenant.name)
        est = Estimate(0, 0, True)
        guard_headers = [(_CLASS_HEADER_OUT, priority_class.header_value)]
        counts_tokens = quota is not None and quota.quota.limits.counts_tokens
        if counts_tokens and stream and not usage.wants_usage:
            # The guard settles with the stream's usage chunk (dropped before the client).
            options = payload.get("stream_options")
            payload["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        body = dump(payload)
        if body is None:
            return await _TOO_DEEP.send(send)
        if self._waiting_bytes + len(body) > self.config.guard.max_waiting_body_bytes:
            self.metrics.count(priority_class.name, Outcome.WAITING_MEMORY_FULL)
            return await _WAITING_MEMORY_FULL.send(send, self._unavailable_headers)
        self._waiting_bytes += len(body)
        usage.waiting_bytes = len(body)

        # From here the request may wait and hold capacity: watch for the client leaving.
        conn = _ClientWatch()
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(_watch_disconnect(receive, conn, task))
        reservation = None
        try:
            if quota is not None:
                charged = await self._charge(
                    send, quota, tenant.name, path, payload, priority_class
                )
                if charged is None:
                    return None  # refused (429 or 400), nothing held
                reservation, est = charged
                charged_at = self.clock.now()
                guard_headers += _ratelimit_headers(quota.quota, charged_at)
                quota_ms = (charged_at - usage.arrived) * 1000
                guard_headers.append((_QUOTA_HEADER, f"{quota_ms:.1f}".encode()))
            completion = (
                est.completion_tokens
                if est.total
                else completion_budget(path, payload, priority_class.default_max_tokens)
            )
            cost = _fair_cost(len(body), est, completion)
            kv = await self._kv_tokens(path, request, len(body), est, completion, priority_class)
            await self._admit_and_forward(
                send, path, body, forwarded, tenant, (cost, kv, request.sequences),
                priority_class, stream, guard_headers, usage,
            )  # fmt: skip
        except asyncio.CancelledError:
            if not conn.gone:
                raise
            task.uncancel()
            self.metrics.count(priority_class.name, Outcome.CLIENT_DISCONNECT)
        finally:
            conn.finished = True
            watcher.cancel()
            self._stop_waiting(usage)
            now = self.clock.now()
            if usage.status:
                self.metrics.served(priority_class.name, usage.arrived, usage.first_at, now)
            if reservation is not None and quota is not None:
                used = usage.used_tokens(est, stream)
                quota.quota.settle(reservation, used, now, sent=usage.sent)
                quota.settled()
                self.metrics.tokens(tenant.name, reservation.tokens, used if usage.sent else 0)
        return None

    async def _charge(
        self,
        send: Any,
        quota: QuotaGate,
        tenant: str,
        path: str,
        payload: dict[str, Any],
        priority_class: PriorityClass,
    ) -> tuple[Reservation, Estimate] | None:
        """Reserve the request's cost on its tenant's quota; or answer 429 (or 400 for a
        request that can never fit) and return None, holding nothing.

        The cheap part first: one request, its concurrency slot and its completion budget
        (a lower bound on its tokens), so a request over its limit costs the engine nothing.
        Only then is the prompt counted (vLLM's /tokenize) and added. If the buckets cannot
        pay that part now, the hold is given back whole and the request waits for its full
        cost like any other (its time waited so far counts against max_wait_s)."""
        limits = quota.quota.limits
        max_wait_s = priority_class.max_wait_s if priority_class.wait_on_limit else 0.0
        clock = self.clock
        started = clock.now()
        est = Estimate(0, 0, True)
        if limits.counts_tokens:
            completion = completion_budget(path, payload, priority_class.default_max_tokens)
            est = Estimate(0, completion, False)
        held = await quota.reserve(est.total, max_wait_s, priority_class.max_queue)
        if isinstance(held, Denied):
            await self._rate_limited(send, tenant, quota.quota, held, est)
            return None
        if not limits.counts_tokens:
            return held, est
        try:
            counting = tokenize_request(path, payload)
            exact = None if counting is None else await self.upstream.tokenize(counting)
            est = estimate(path, payload, priority_class.default_max_tokens, exact)
        except BaseException:  # the client left while its prompt was counted
            quota.quota.settle(held, 0, clock.now(), sent=False)
            quota.settled()
            raise
        extra = est.total - held.tokens
        if extra > 0 and not quota.quota.top_up(held, extra, clock.now()):
            quota.quota.settle(held, 0, clock.now(), sent=False)
            quota.settled()
            waited_s = clock.now() - started
            wait_s = max(0.0, max_wait_s - waited_s)
            held = await quota.reserve(est.total, wait_s, priority_class.max_queue)
            if isinstance(held, Denied):
                await self._rate_limited(send, tenant, quota.quota, held, est)
                return None
        return held, est

    async def _kv_tokens(
        self,
        path: str,
        request: ParsedRequest,
        body_bytes: int,
        est: Estimate,
        completion: int,
        priority_class: PriorityClass,
    ) -> int:
        """KV-cache tokens the request reserves: its prompt + completion budget for each of
        its n sequences, each capped at the model's max_model_len. The prompt is counted
        exactly (vLLM's /tokenize) only where it matters: a request whose tokenizer-free
        upper bound already fits the headroom reserves the bound and costs nothing extra."""
        if self.admission.kv.capacity is None:
            return 0
        payload = request.payload
        if est.total and est.exact_prompt:  # already counted for the tenant's quota
            prompt = est.prompt_tokens
        else:
            prompt = prompt_token_bound(path, payload, body_bytes)
            if prompt * request.n + completion > self.admission.kv_headroom(priority_class):
                body = tokenize_request(path, payload)
                exact = None if body is None else await self.upstream.tokenize(body)
                if exact is not None:
                    prompt = exact
        tokens = prompt * request.n + completion
        limit = self.monitor.max_model_len
        return min(tokens, limit * request.sequences) if limit else tokens

    async def _rate_limited(
        self, send: Any, tenant: str, quota: QuotaStore, denied: Denied, est: Estimate
    ) -> None:
        now = self.clock.now()
        headers = _ratelimit_headers(quota, now)
        self.metrics.rate_limited(tenant, denied.dimension)
        if denied.retry_after_s == float("inf"):
            needs = (
                f"an estimated {est.total} tokens ({est.prompt_tokens} prompt + "
                f"{est.completion_tokens} completion)"
                if est.prompt_tokens
                else f"at least {est.completion_tokens} tokens for its completion"
            )
            return await responses.ErrorResponse(
                400,
                f"This request needs {needs}, more than the {denied.dimension} limit of "
                f"{denied.limit:g} can ever allow; lower max_tokens or split it.",
                "invalid_request_error",
                "request_exceeds_limit",
                param="max_tokens",
            ).send(send, headers)
        # Concurrency has no refill time: a slot frees when one of the tenant's requests ends.
        wait_s = max(denied.retry_after_s, 0.001) if denied.retry_after_s else 1.0
        message = (
            f"Rate limit reached for tenant {tenant!r} on {denied.dimension} "
            f"(limit {denied.limit:g}); retry after the delay in the retry-after header."
        )
        response = responses.ErrorResponse(429, message, "rate_limit_exceeded", denied.dimension)
        headers += [
            (b"retry-after", str(min(60, max(1, math.ceil(wait_s)))).encode()),
            (b"retry-after-ms", str(math.ceil(wait_s * 1000)).encode()),
        ]
        await response.send(send, headers)

    async def _admit_and_forward(
        self,
        send: Any,
        path: str,
        body: bytes,
        forwarded: list[tuple[bytes, bytes]],
        tenant: Tenant,
        size: tuple[float, int, int],
        priority_class: PriorityClass,
        stream: bool,
        guard_headers: list[tuple[bytes, bytes]],
        usage: _Usage,
    ) -> None:
        """`size`: the request's fair-queueing cost, the KV tokens it reserves and the
        engine slots (sequences) it holds."""
        clock = self.clock
        started = clock.now()
        cost, kv, seqs = size
        try:
            ticket = await self.gate.acquire(
                priority_class, tenant.name, cost, tenant.weight, kv, seqs
            )
        except Refused as refused:
            return await self._refuse(send, refused)
        self._stop_waiting(usage)
        try:
            waited_s = clock.now() - started
            self.metrics.queue_wait[priority_class.name].observe(waited_s)
            guard_headers = [*guard_headers, (_QUEUE_HEADER, f"{waited_s * 1000:.1f}".encode())]
            outcome = await self._forward(send, path, body, forwarded, guard_headers, stream, usage)
            self.metrics.count(priority_class.name, outcome)
        finally:
            self.gate.release(ticket)
        return None

    def _stop_waiting(self, usage: _Usage) -> None:
        """The request left the guard's waiting stages (admitted, refused or gone): its
        body no longer counts against the waiting-bytes budget."""
        self._waiting_bytes -= usage.waiting_bytes
        usage.waiting_bytes = 0

    async def _refuse(self, send: Any, refused: Refused) -> None:
        name = refused.priority_class.name
        if refused.reason is RefusalReason.QUEUE_FULL:
            self.metrics.count(name, Outcome.QUEUE_FULL)
            message = (
                f"The {name!r} queue is full ({refused.priority_class.max_queue} requests "
                "waiting); retry after the delay in the retry-after header."
            )
        else:
            self.metrics.count(name, Outcome.QUEUE_TIMEOUT)
            message = (
                f"No engine slot became free for class {name!r} within its max_wait_s of "
                f"{refused.priority_class.max_wait_s:g} s; retry after the delay in the "
                "retry-after header."
            )
        response = responses.ErrorResponse(
            503, message, "service_unavailable", refused.reason.value
        )
        retry_ms = int(refused.retry_after_s * 1000)
        await response.send(
            send,
            [
                (b"retry-after", retry_after_header(refused.retry_after_s)),
                (b"retry-after-ms", str(retry_ms).encode()),
                (_CLASS_HEADER_OUT, refused.priority_class.header_value),
            ],
        )

    async def _forward(
        self,
        send: Any,
        path: str,
        body: bytes,
        forwarded: list[tuple[bytes, bytes]],
        guard_headers: list[tuple[bytes, bytes]],
        stream: bool,
        usage: _Usage,
    ) -> Outcome:
        """Send the request to vLLM and its answer to the client; returns the outcome.
        Notes in `usage` what vLLM reported the request cost."""
        usage.sent = True
        try:
            resp = await self.upstream.post(path, body, forwarded)
        except _UPSTREAM_ERRORS as exc:
            # Only a connection never made proves vLLM never saw the request.
            usage.sent = not isinstance(exc, UpstreamConnectError)
            return await self._upstream_failed(send, exc, guard_headers)

        headers = [(k, v) for k, v in resp.headers if k in FORWARDED_RESPONSE_HEADERS]
        headers += guard_headers
        usage.status = resp.status
        is_stream = stream and (resp.header(b"content-type") or b"").startswith(_EVENT_STREAM)
        try:
            if not is_stream:
                data = await resp.read()
                usage.total = _usage_of_body(data)
                headers.append((b"content-length", b"%d" % len(data)))
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": headers}
                )
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return Outcome.OK
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            tap = UsageTap(keep_usage=usage.wants_usage)
            try:
                async for chunk in resp.chunks():
                    out = tap.feed(chunk)
                    if out:
                        if usage.first_at is None:
                            usage.first_at = self.clock.now()
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                rest = tap.flush()
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
            except _UPSTREAM_ERRORS as exc:
                log.warning("upstream stream broke: %s", type(exc).__name__)
                event = responses.sse_error_event(
                    "The inference engine stopped in the middle of this response.",
                    "upstream_error",
                )
                await send({"type": "http.response.body", "body": event, "more_body": False})
                return Outcome.UPSTREAM_ERROR
            finally:
                usage.events = tap.events
                usage.total = usage_total(tap.usage)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return Outcome.OK
        except _UPSTREAM_ERRORS as exc:
            return await self._upstream_failed(send, exc, guard_headers)
        finally:
            # A response not read to its end drops its connection: that is how vLLM learns
            # to abort the request and free its KV blocks, and no leftover of it can reach
            # the next request on a pooled connection.
            resp.release()

    async def _upstream_failed(
        self, send: Any, exc: BaseException, guard_headers: list[tuple[bytes, bytes]]
    ) -> Outcome:
        """Answer for a vLLM that failed before the response started: 504 when it went
        silent, else 503 with retry-after, since a vLLM that drops connections is usually
        restarting."""
        if isinstance(exc, TimeoutError):
            await responses.UPSTREAM_TIMEOUT.send(send, guard_headers)
        else:
            await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers + guard_headers)
        return Outcome.UPSTREAM_ERROR


# ---------------------------------------------------------------------------------------

_UPSTREAM_ERRORS = (OSError, TimeoutError)

_TOO_LARGE = object()


async def _read_body(receive: Any, limit: int) -> bytes | object | None:
    """The whole request body; `_TOO_LARGE` past `limit`; None if the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _TOO_LARGE
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _fair_cost(body_bytes: int, est: Estimate, completion: int) -> float:
    """Fair-queueing cost: prompt tokens x1 + completion tokens x2 (decode steps cost more
    than prefill). Tenants without token limits were not tokenized: a quarter of the body's
    bytes stands in for the prompt (fairness needs proportions, not exact counts)."""
    prompt = est.prompt_tokens if est.total else body_bytes / HEURISTIC_BYTES_PER_TOKEN
    return prompt + 2 * completion


def _asked_for_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage_of_body(data: bytes) -> int | None:
    try:
        return usage_total(json.loads(data).get("usage"))
    except (ValueError, AttributeError):
        return None


def _ratelimit_headers(quota: QuotaStore, now: float) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers, for the dimensions the tenant is limited on."""
    snap = quota.snapshot(now)
    headers = []
    if snap.limit_requests is not None:
        headers += [
            (b"x-ratelimit-limit-requests", b"%d" % snap.limit_requests),
            (b"x-ratelimit-remaining-requests", b"%d" % snap.remaining_requests),
            (b"x-ratelimit-reset-requests", go_duration(snap.reset_requests_s).encode()),
        ]
    if snap.limit_tokens is not None:
        headers += [
            (b"x-ratelimit-limit-tokens", b"%d" % snap.limit_tokens),
            (b"x-ratelimit-remaining-tokens", b"%d" % snap.remaining_tokens),
            (b"x-ratelimit-reset-tokens", go_duration(snap.reset_tokens_s).encode()),
        ]
    return headers


_WAITING_MEMORY_FULL = responses.ErrorResponse(
    503,
    "vllm-guard holds as many waiting request bodies as its memory budget allows "
    "(guard.max_waiting_body_bytes); retry after the delay in the retry-after header.",
    "service_unavailable",
    "waiting_memory_full",
)
_SEVERAL_AUTHORIZATIONS = responses.bad_request("Send exactly one Authorization header.")
_TOO_DEEP = responses.bad_request("Request body is nested too deeply.")


def _too_many_sequences(
    request: ParsedRequest, priority_class: PriorityClass, max_seqs: int
) -> responses.ErrorResponse:
    return responses.bad_request(
        f"This request runs {request.sequences} sequences ({request.prompts} prompts x n="
        f"{request.n}); class {priority_class.name!r} runs at most {max_seqs} at once. "
        "Split it into smaller requests.",
        param="n" if request.prompts == 1 else "prompt",
    )


async def _watch_disconnect(receive: Any, conn: _ClientWatch, task: asyncio.Task[Any]) -> None:
    """Cancel the request's task when its client disconnects before the response is done."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    if not conn.finished:
        conn.gone = True
        task.cancel()
