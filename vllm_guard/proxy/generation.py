"""A guarded generation request, top-down (see docs/DESIGN.md):

auth -> class -> engine up? -> body (size, JSON, fields, as vLLM reads them) -> tenant quota
(the cheap dimensions, then the counted prompt; 429 or wait) -> KV size -> admission (the
class's queue) -> forward with the class's `priority` -> stream back -> release the slot ->
settle the quota with the real usage.

Every path out of `handle` releases what the request holds: the slot is returned and the
quota settled in `finally`s, a queued request leaves its queue when its task is cancelled,
and a client that disconnects cancels the task, which closes the upstream connection so
vLLM aborts the request and frees its KV cache.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_guard.config import CompiledConfig
from vllm_guard.core.admission import Admission
from vllm_guard.core.classes import PriorityClass
from vllm_guard.core.cost import (
    HEURISTIC_BYTES_PER_TOKEN,
    Estimate,
    completion_budget,
    prompt_token_bound,
    tokenize_request,
)
from vllm_guard.engine.state import AnyEngine, EngineState
from vllm_guard.proxy import responses
from vllm_guard.proxy.admission_gate import Gate, Refused, TooManySequences, retry_after_header
from vllm_guard.proxy.body import ParsedRequest, dump, parse_request
from vllm_guard.proxy.charge import ratelimit_headers
from vllm_guard.proxy.classify import clamp_priority, resolve_class
from vllm_guard.proxy.clock import Clock
from vllm_guard.proxy.forward import Forwarder
from vllm_guard.proxy.metrics import GuardMetrics, Outcome
from vllm_guard.proxy.quota_gate import TenantGate
from vllm_guard.proxy.request import (
    CLASS_HEADER_OUT,
    TOO_LARGE,
    ClientWatch,
    Request,
    RequestHead,
    receive_body,
    watch_disconnect,
)
from vllm_guard.proxy.rules import Rules
from vllm_guard.proxy.usage import RequestUsage, asked_for_usage
from vllm_guard.upstream.connections import Upstream
from vllm_guard.upstream.monitor import EngineMonitor

Scope = dict[str, Any]

_QUEUE_HEADER = b"x-vllm-guard-queue-ms"
_QUOTA_HEADER = b"x-vllm-guard-quota-ms"  # estimate + waiting for the tenant's budget


MAX_SESSIONS = 100_000
"""Sessions whose engine the guard remembers (several engines, `engine.affinity: session`)."""


class Generation:
    """POST /v1/chat/completions and /v1/completions through the guard."""

    def __init__(
        self,
        config: CompiledConfig,
        engines: Sequence[EngineState],
        upstreams: Sequence[Upstream],
        admission: Admission,
        gate: Gate,
        quota_gates: Mapping[str, TenantGate],
        metrics: GuardMetrics,
        monitor: EngineMonitor,
        clock: Clock,
    ) -> None:
        """`config`: as loaded at start; what a reload changes is in `rules` (see `use`)."""
        self.config = config
        # Is there an engine to take it? Asked once per request.
        self.engine = engines[0] if len(engines) == 1 else AnyEngine(engines)
        self.upstreams = upstreams
        self._engines = engines  # each upstream's state
        self.admission = admission
        self.gate = gate
        self.metrics = metrics
        self.monitor = monitor
        self.clock = clock
        self.rules = Rules(config, quota_gates, self.tokenize, metrics, clock)
        self._unavailable_headers = [
            (b"retry-after", str(config.guard.unavailable_retry_after_s).encode())
        ]
        self._too_large = responses.body_too_large(config.guard.max_body_bytes)
        self.forward = Forwarder(clock, self._unavailable_headers)
        self.waiting_bytes = 0  # bodies of requests not yet admitted (quota or queue)
        self._sessions: OrderedDict[tuple[str, bytes], int] = OrderedDict()

    def use(self, config: CompiledConfig, quota_gates: Mapping[str, TenantGate]) -> None:
        """Serve new requests under a reloaded config (`config.reload_config`: only what a
        reload may change differs); requests under way keep the rules they arrived with."""
        self.rules = Rules(config, quota_gates, self.tokenize, self.metrics, self.clock)

    async def handle(self, scope: Scope, receive: Any, send: Any, path: str) -> None:
        """The stages in order; each answers and returns None when the request stops there."""
        head = RequestHead.read(scope["headers"])
        if head is None:
            return await _SEVERAL_AUTHORIZATIONS.send(send)
        req = await self._identify(send, head, path)
        if req is None or not await self._read_body(send, receive, head, req):
            return None
        if not await self._hold_waiting_bytes(send, req):
            return None
        # From here the request may wait and hold capacity: watch for the client leaving.
        watch = ClientWatch()
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(watch_disconnect(receive, watch, task))
        try:
            if await self._charge_quota(send, req):
                await self._admit_and_forward(send, req)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task.uncancel()
            self.metrics.count(req.priority_class.name, Outcome.CLIENT_DISCONNECT)
        finally:
            watch.finished = True
            watcher.cancel()
            self._settle(req)
        return None

    # -- the stages ------------------------------------------------------------------------

    async def _identify(self, send: Any, head: RequestHead, path: str) -> Request | None:
        """Auth (API key -> tenant), then the class (its own, or a less urgent one asked
        for), then: is the engine there to take it?"""
        rules = self.rules  # this request's, to its end
        tenant = rules.auth.tenant_for(head.authorization)
        if tenant is None:
            await responses.UNAUTHORIZED.send(send)
            return None
        self.metrics.request(tenant.name)
        priority_class = resolve_class(tenant, head.class_header, rules.config.classes_by_name)
        if isinstance(priority_class, responses.ErrorResponse):
            await priority_class.send(send)
            return None
        if not self.engine.ready:
            self.metrics.count(priority_class.name, Outcome.ENGINE_UNAVAILABLE)
            await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)
            return None
        return Request(path, tenant, priority_class, head.forwarded, self.clock.now(), rules)

    async def _read_body(self, send: Any, receive: Any, head: RequestHead, req: Request) -> bool:
        """The body: its size, JSON and fields as vLLM reads them; the class's priority; the
        sequences it runs against what the class can hold; the body to forward."""
        limit = self.config.guard.max_body_bytes
        length = head.content_length
        if length is not None and length.isdigit() and int(length) > limit:
            await self._too_large.send(send)
            return False
        raw = await receive_body(receive, limit)
        if raw is None:
            return False  # client left while sending its body
        if raw is TOO_LARGE:
            await self._too_large.send(send)
            return False
        assert isinstance(raw, bytes)
        request = parse_request(raw, req.path)
        if isinstance(request, responses.ErrorResponse):
            await request.send(send)
            return False
        payload = request.payload
        priority = clamp_priority(payload.get("priority"), req.priority_class)
        if isinstance(priority, responses.ErrorResponse):
            await priority.send(send)
            return False
        payload["priority"] = priority
        salt = req.rules.cache_salts.for_request(req.tenant, payload.get("cache_salt"))
        if isinstance(salt, responses.ErrorResponse):
            await salt.send(send)
            return False
        if salt is not None:
            payload["cache_salt"] = salt
        max_seqs = self.admission.max_seqs(req.priority_class)
        if request.sequences > max_seqs:
            await _too_many_sequences(request, req.priority_class, max_seqs).send(send)
            return False
        req.parsed = request
        # `arrived`: the guard has the whole request now (latency and quota-ms count from here).
        req.usage = RequestUsage(asked_for_usage(payload), self.clock.now())
        req.quota = req.rules.quota_gates.get(req.tenant.name)
        counts_tokens = req.quota is not None and req.quota.limits.counts_tokens
        if counts_tokens and request.stream and not req.usage.wants_usage:
            # The guard settles with the stream's usage chunk (dropped before the client).
            options = payload.get("stream_options")
            payload["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        body = dump(payload)
        if body is None:
            await _TOO_DEEP.send(send)
            return False
        req.body = body
        return True

    async def _hold_waiting_bytes(self, send: Any, req: Request) -> bool:
        """Count the body against guard.max_waiting_body_bytes until it is admitted."""
        size = len(req.body)
        if self.waiting_bytes + size > self.config.guard.max_waiting_body_bytes:
            self.metrics.count(req.priority_class.name, Outcome.WAITING_MEMORY_FULL)
            await _WAITING_MEMORY_FULL.send(send, self._unavailable_headers)
            return False
        self.waiting_bytes += size
        req.usage.waiting_bytes = size
        return True

    async def _charge_quota(self, send: Any, req: Request) -> bool:
        """Reserve the request's cost on its tenant's quota (no quota: nothing to do);
        False once a refusal was sent."""
        quota = req.quota
        if quota is None:
            return True
        parsed = req.parsed
        try:
            charged = await req.rules.charge(
                send, quota, req.tenant.name, req.path, parsed.payload, req.priority_class
            )
        except Refused as refused:  # the server drains, or the quota store is down
            retry_s = float(self.config.guard.unavailable_retry_after_s)
            await self._refuse(send, req, Refused(refused.reason, refused.priority_class, retry_s))
            return False
        if charged is None:
            return False  # refused (429 or 400), nothing held
        req.reservation, req.est = charged
        charged_at = self.clock.now()
        req.guard_headers += ratelimit_headers(quota)
        quota_ms = (charged_at - req.usage.arrived) * 1000
        req.guard_headers.append((_QUOTA_HEADER, f"{quota_ms:.1f}".encode()))
        return True

    async def _admit_and_forward(self, send: Any, req: Request) -> None:
        """Wait for engine slots and KV headroom in the class's queue, then forward; the
        slot goes back however forwarding ends."""
        parsed, est, priority_class, tenant = req.parsed, req.est, req.priority_class, req.tenant
        completion = (
            est.completion_tokens
            if est.total
            else completion_budget(req.path, parsed.payload, priority_class.default_max_tokens)
        )
        cost = _fair_cost(len(req.body), est, completion)
        # A class the engine preempts reserves no KV (engine.scheduler: guard).
        kv = await self._kv_tokens(req, completion) if priority_class.kv_admission else 0
        started = self.clock.now()
        several = len(self.upstreams) > 1
        tries_left = len(self.upstreams) - 1  # another engine for one that never took it
        session = self._session_of(req) if several else None
        while True:
            affinity = self._sessions.get(session, -1) if session is not None else -1
            try:
                ticket = await self.gate.acquire(
                    priority_class, tenant.name, cost, tenant.weight, kv, parsed.sequences, affinity
                )
            except Refused as refused:
                return await self._refuse(send, req, refused)
            except TooManySequences as too_many:  # a reload lowered the class's slots
                too_large = _too_many_sequences(parsed, priority_class, too_many.max_seqs)
                return await too_large.send(send)
            if session is not None:
                self._remember(session, ticket.engine)
            self._stop_waiting(req.usage)
            try:
                waited_s = self.clock.now() - started
                self.metrics.queue_wait[priority_class.name].observe(waited_s)
                headers = [*req.guard_headers, (_QUEUE_HEADER, f"{waited_s * 1000:.1f}".encode())]
                outcome = await self.forward(
                    send,
                    self.upstreams[ticket.engine],
                    req.path,
                    req.body,
                    req.forwarded,
                    headers,
                    parsed.stream,
                    req.usage,
                    failover=several,
                )
                if outcome is Outcome.NOT_TAKEN:
                    self._out_of_rotation(ticket.engine)
                    if tries_left > 0 and self.engine.ready:
                        tries_left -= 1
                        continue
                    outcome = Outcome.UPSTREAM_ERROR
                    await responses.ENGINE_UNAVAILABLE.send(
                        send, self._unavailable_headers + headers
                    )
                self.metrics.count(priority_class.name, outcome)
            finally:
                self.gate.release(ticket)
            return None

    def _session_of(self, req: Request) -> tuple[str, bytes] | None:
        """The conversation a request belongs to (`x-session-id`, per tenant), where
        `engine.affinity` is `session`."""
        if self.config.engine.affinity != "session":
            return None
        for name, value in req.forwarded:
            if name == b"x-session-id":
                return req.tenant.name, value
        return None

    def _remember(self, session: tuple[str, bytes], engine: int) -> None:
        """The engine a session last ran on (the most recent `MAX_SESSIONS` sessions)."""
        sessions = self._sessions
        sessions[session] = engine
        sessions.move_to_end(session)
        if len(sessions) > MAX_SESSIONS:
            sessions.popitem(last=False)

    def _out_of_rotation(self, engine: int) -> None:
        """An engine refused a connection (or dropped one before answering anything): out
        of rotation until its health check passes again; its request goes to another."""
        self.metrics.failover(engine)
        state = self._engines[engine]
        if state.ready:
            state.set("unreachable")

    def ready_upstream(self) -> Upstream:
        """An engine that takes requests (the first one, if none does)."""
        for upstream, state in zip(self.upstreams, self._engines, strict=True):
            if state.ready:
                return upstream
        return self.upstreams[0]

    async def tokenize(self, body: dict[str, Any]) -> int | None:
        """vLLM's /tokenize count for `body` on an engine that is up (None: no answer)."""
        return await self.ready_upstream().tokenize(body)

    def _settle(self, req: Request) -> None:
        """However the request ended: its waiting bytes, its latency, and its quota settled
        with what it really used."""
        self._stop_waiting(req.usage)
        now = self.clock.now()
        usage = req.usage
        if usage.status:
            self.metrics.served(req.priority_class.name, usage.arrived, usage.first_at, now)
        quota, reservation = req.quota, req.reservation
        if reservation is not None and quota is not None:
            used = usage.used_tokens(req.est, req.parsed.stream)
            quota.settle(reservation, used, sent=usage.sent)
            self.metrics.tokens(req.tenant.name, reservation.tokens, used if usage.sent else 0)

    async def _kv_tokens(self, req: Request, completion: int) -> int:
        """KV-cache tokens the request reserves: its prompt + completion budget for each of
        its n sequences, each capped at the model's max_model_len. The prompt is counted
        exactly (vLLM's /tokenize) only where it matters: a request whose tokenizer-free
        upper bound already fits the headroom reserves the bound and costs nothing extra."""
        if not self.admission.kv_known:
            return 0
        parsed, est = req.parsed, req.est
        payload = parsed.payload
        if est.total and est.exact_prompt:  # already counted for the tenant's quota
            prompt = est.prompt_tokens
        else:
            prompt = prompt_token_bound(req.path, payload, len(req.body))
            if prompt * parsed.n + completion > self.admission.kv_headroom(req.priority_class):
                body = tokenize_request(req.path, payload)
                exact = None if body is None else await self.tokenize(body)
                if exact is not None:
                    prompt = exact
        tokens = prompt * parsed.n + completion
        limit = self.monitor.max_model_len
        return min(tokens, limit * parsed.sequences) if limit else tokens

    async def _refuse(self, send: Any, req: Request, refused: Refused) -> None:
        name = refused.priority_class.name
        self.metrics.count(name, Outcome(refused.reason.value))
        retry_ms = int(refused.retry_after_s * 1000)
        headers = [
            (b"retry-after", retry_after_header(refused.retry_after_s)),
            (b"retry-after-ms", str(retry_ms).encode()),
            (CLASS_HEADER_OUT, refused.priority_class.header_value),
        ]
        await req.rules.refusals[name, refused.reason].send(send, headers)

    def _stop_waiting(self, usage: RequestUsage) -> None:
        """The request left the guard's waiting stages (admitted, refused or gone): its
        body no longer counts against the waiting-bytes budget."""
        self.waiting_bytes -= usage.waiting_bytes
        usage.waiting_bytes = 0


# ---------------------------------------------------------------------------------------


def _fair_cost(body_bytes: int, est: Estimate, completion: int) -> float:
    """Fair-queueing cost: prompt tokens x1 + completion tokens x2 (decode steps cost more
    than prefill). Tenants without token limits were not tokenized: a quarter of the body's
    bytes stands in for the prompt (fairness needs proportions, not exact counts)."""
    prompt = est.prompt_tokens if est.total else body_bytes / HEURISTIC_BYTES_PER_TOKEN
    return prompt + 2 * completion


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
