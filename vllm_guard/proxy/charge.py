"""Charging a request to its tenant's quota: the cheap dimensions first, then the counted
prompt; the 429 (or 400) when it does not fit, with OpenAI's x-ratelimit-* headers."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from vllm_guard.core.classes import PriorityClass, Tenant
from vllm_guard.core.cost import Estimate, completion_budget, estimate, tokenize_request
from vllm_guard.core.quota import Denied, Reservation, go_duration
from vllm_guard.proxy import responses
from vllm_guard.proxy.admission_gate import RefusalReason, Refused
from vllm_guard.proxy.clock import Clock
from vllm_guard.proxy.metrics import GuardMetrics
from vllm_guard.proxy.quota_gate import DRAINED, STORE_DOWN, TenantGate


class QuotaCharge:
    def __init__(
        self,
        tenants: Mapping[str, Tenant],
        tokenize: Callable[[dict[str, Any]], Awaitable[int | None]],
        metrics: GuardMetrics,
        clock: Clock,
    ) -> None:
        self.tokenize = tokenize  # vLLM's /tokenize count, or None
        self.metrics = metrics
        self.clock = clock
        # The 429 of each tenant and dimension, built once at load.
        self._limit_reached = {
            (name, dim): responses.ErrorResponse(
                429,
                f"Rate limit reached for tenant {name!r} on {dim} (limit "
                f"{getattr(t.limits, dim):g}); retry after the delay in the retry-after header.",
                "rate_limit_exceeded",
                dim,
            )
            for name, t in tenants.items()
            if t.limits is not None
            for dim in t.limits.dimensions()
        }

    async def __call__(
        self,
        send: Any,
        quota: TenantGate,
        tenant: str,
        path: str,
        payload: dict[str, Any],
        priority_class: PriorityClass,
    ) -> tuple[Reservation, Estimate] | None:
        """Reserve the request's cost on its tenant's quota; or answer 429 (or 400 for a
        request that can never fit) and return None, holding nothing; raises `Refused`
        when the server drains while it waits (shutting_down), or when the shared quota
        store is down and the class's `on_store_down` is `reject` (quota_store_unavailable).

        The cheap part first: one request, its concurrency slot and its completion budget
        (a lower bound on its tokens), so a request over its limit costs the engine nothing.
        Only then is the prompt counted (vLLM's /tokenize) and added. If the buckets cannot
        pay that part now, the hold is given back whole and the request waits for its full
        cost like any other (its time waited so far counts against max_wait_s)."""
        limits = quota.limits
        max_wait_s = priority_class.max_wait_s if priority_class.wait_on_limit else 0.0
        clock = self.clock
        started = clock.now()
        est = Estimate(0, 0, True)
        if limits.counts_tokens:
            completion = completion_budget(path, payload, priority_class.default_max_tokens)
            est = Estimate(0, completion, False)
        held = _not_drained(
            await quota.reserve(est.total, max_wait_s, priority_class.max_queue), priority_class
        )
        if isinstance(held, Denied):
            await self._rate_limited(send, tenant, quota, held, est)
            return None
        if not limits.counts_tokens:
            return held, est
        try:
            counting = tokenize_request(path, payload)
            exact = None if counting is None else await self.tokenize(counting)
            est = estimate(path, payload, priority_class.default_max_tokens, exact)
        except BaseException:  # the client left while its prompt was counted
            quota.settle(held, 0, sent=False)
            raise
        extra = est.total - held.tokens
        if extra > 0 and not await quota.top_up(held, extra):
            quota.settle(held, 0, sent=False)
            waited_s = clock.now() - started
            wait_s = max(0.0, max_wait_s - waited_s)
            held = _not_drained(
                await quota.reserve(est.total, wait_s, priority_class.max_queue), priority_class
            )
            if isinstance(held, Denied):
                await self._rate_limited(send, tenant, quota, held, est)
                return None
        return held, est

    async def _rate_limited(
        self, send: Any, tenant: str, quota: TenantGate, denied: Denied, est: Estimate
    ) -> None:
        headers = ratelimit_headers(quota)
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
        response = self._limit_reached[tenant, denied.dimension]
        headers += [
            (b"retry-after", str(min(60, max(1, math.ceil(wait_s)))).encode()),
            (b"retry-after-ms", str(math.ceil(wait_s * 1000)).encode()),
        ]
        await response.send(send, headers)


def _not_drained(held: Reservation | Denied | object, priority_class: PriorityClass) -> Any:
    """`held` as it is; the 503 (raised) for `DRAINED` and `STORE_DOWN`."""
    if held is DRAINED:
        raise Refused(RefusalReason.SHUTTING_DOWN, priority_class, 0.0)
    if held is STORE_DOWN:
        raise Refused(RefusalReason.QUOTA_STORE_DOWN, priority_class, 0.0)
    return held


def ratelimit_headers(quota: TenantGate) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers, for the dimensions the tenant is limited on."""
    snap = quota.snapshot()
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
