"""A rate-limited async client for OpenAI-compatible endpoints (the guard, vLLM, hosted APIs).

What it does before and after each request, so a batch job cannot hammer a server:

- **Local limits before sending**: requests/min and tokens/min token buckets (the guard's
  own `TokenBucket`, on the loop's clock) and a concurrency cap. Set them explicitly, or
  let the client learn them from the server's `x-ratelimit-limit-*` headers as responses
  arrive (starting from `x-ratelimit-remaining-*` when it learns or a limit changes).
- **Retries** only for what is retryable — statuses 429, 502, 503, 504 and connection
  errors and timeouts (by exception type, never by message text). The wait is exactly the
  server's `retry-after-ms` (else `retry-after` seconds) when it sends one, up to
  `max_retry_after_s` (300 s), else exponential backoff with full jitter; a call given a
  `deadline_s` does not wait for a retry that would begin after it. When attempts run out
  (or the deadline would pass), `RetriesExhausted` carries the last response (or exception).
- **Callers waiting on the local buckets** queue in line (FIFO) behind one sleeping head.
- **Adaptive concurrency** (AIMD): the in-flight limit grows by one per limit's worth of
  successes and halves on a 429/503 or when latency rises past `latency_factor` x the
  best seen, at most once per `backoff_cooldown_s` — the job finds the server's capacity.
- **Stats**: requests, rate-limit hits and hit rate, retries, waiting and in flight, p95
  latency including local waits — for the batch runner's display and for callers.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from vllm_guard.core.cost import completion_budget, heuristic_prompt_tokens
from vllm_guard.core.quota import TokenBucket

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
_RETRYABLE_ERRORS = (httpx.TransportError,)  # connect/read/write errors and timeouts


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: Any
    """Parsed JSON, or the text when the body is not JSON."""
    attempts: int
    latency_s: float
    """From the call to the final answer: local waits, retries and backoff included."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class RetriesExhausted(Exception):
    """Every attempt failed retryably; `last` is the final response or exception."""

    def __init__(self, attempts: int, last: Response | BaseException) -> None:
        what = f"status {last.status}" if isinstance(last, Response) else type(last).__name__
        super().__init__(f"gave up after {attempts} attempts (last: {what})")
        self.attempts = attempts
        self.last = last


@dataclass
class RetryEvent:
    """One retry: when the refusal came, the delay the server advertised (None if it did
    not), the delay waited, and when the retry was sent (loop clock)."""

    status: int | None
    refused_at: float
    advertised_s: float | None
    waited_s: float
    sent_at: float = math.nan


@dataclass
class ClientStats:
    requests: int = 0  # attempts sent
    rate_limited: int = 0  # 429s received
    retries: int = 0
    waiting: int = 0  # calls waiting for a local permit (concurrency or bucket)
    in_flight: int = 0
    retrying: int = 0  # calls sleeping before a retry
    tokens: int = 0  # usage.total_tokens of successful answers
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    retry_log: deque[RetryEvent] = field(default_factory=lambda: deque(maxlen=10000))

    @property
    def hit_rate(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    def latency_p95_s(self) -> float:
        if not self.latencies_s:
            return math.nan
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class _Aimd:
    """Additive increase, multiplicative decrease of the in-flight limit."""

    def __init__(self, initial: int, maximum: int, cooldown_s: float) -> None:
        self.limit = float(max(1, min(initial, maximum)))
        self.maximum = maximum
        self.cooldown_s = cooldown_s
        self._last_cut = -math.inf

    def success(self) -> None:
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)

    def overload(self, now: float) -> None:
        if now - self._last_cut >= self.cooldown_s:
            self.limit = max(1.0, self.limit / 2)
            self._last_cut = now


class LimitedClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_concurrency: int = 64,
        initial_concurrency: int | None = None,
        adaptive: bool = True,
        learn_limits: bool = True,
        max_attempts: int = 8,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        latency_factor: float = 3.0,
        backoff_cooldown_s: float = 2.0,
        timeout_s: float = 600.0,
        max_retry_after_s: float = 300.0,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        _check_positive(
            max_attempts=max_attempts,
            max_concurrency=max_concurrency,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            latency_factor=latency_factor,
            timeout_s=timeout_s,
            max_retry_after_s=max_retry_after_s,
        )
        if backoff_cooldown_s < 0:
            raise ValueError(f"backoff_cooldown_s must be >= 0 (got {backoff_cooldown_s!r})")
        if initial_concurrency is not None and not 1 <= initial_concurrency <= max_concurrency:
            raise ValueError(
                f"initial_concurrency must be between 1 and max_concurrency={max_concurrency} "
                f"(got {initial_concurrency!r})"
            )
        all_headers = dict(headers or {})
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=all_headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=64),
            transport=transport,
        )
        self.stats = ClientStats()
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.latency_factor = latency_factor
        self.learn_limits = learn_limits
        self._sleep = sleep
        self._rng = rng or random.Random()
        start = initial_concurrency or (min(4, max_concurrency) if adaptive else max_concurrency)
        self._aimd = _Aimd(start, max_concurrency, backoff_cooldown_s)
        self._adaptive = adaptive
        self._cond = asyncio.Condition()
        # Callers held by the buckets wait in line behind one sleeping head (asyncio.Lock
        # is FIFO), not each in a sleep loop of its own that all wake at every refill.
        self._bucket_line = asyncio.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        if requests_per_minute:
            self._set_bucket("requests", requests_per_minute)
        if tokens_per_minute:
            self._set_bucket("tokens", tokens_per_minute)
        self._best_latency_s = math.inf

    @property
    def concurrency_limit(self) -> int:
        return max(1, math.floor(self._aimd.limit))

    @property
    def limits(self) -> dict[str, float]:
        """The local per-minute limits in force (set or learned)."""
        return {name: b.rate * 60 for name, b in self._buckets.items()}

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> LimitedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the call --------------------------------------------------------------------------

    async def post(
        self, path: str, body: dict[str, Any], deadline_s: float | None = None
    ) -> Response:
        """POST `body` as JSON, within the local limits, retrying what is retryable.
        Returns the final response (any status that is not retryable, or success); raises
        `RetriesExhausted` when every attempt failed retryably, or when the next retry
        would begin after `deadline_s` (seconds from this call) — it does not wait then.
        A server's advertised delay is obeyed up to `max_retry_after_s`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        cost = heuristic_prompt_tokens(path, body) + completion_budget(path, body, 256)
        last: Response | BaseException | None = None
        retry: RetryEvent | None = None  # this call's pending retry, if any
        for attempt in range(1, self.max_attempts + 1):
            held = await self._acquire(cost)
            self.stats.requests += 1
            sent = loop.time()
            if retry is not None:
                retry.sent_at = sent
            try:
                resp = await self._http.post(path, json=body)
            except _RETRYABLE_ERRORS as exc:
                await self._release(held, None, loop.time() - sent, overloaded=True)
                last = exc
                delay, advertised = self._backoff(attempt), None
                status = None
            else:
                answer = _response(resp, attempt)
                used = _usage_total(answer.body)
                self._learn(answer.headers, loop.time())
                overloaded = answer.status in (429, 503)
                await self._release(held, used, loop.time() - sent, overloaded=overloaded)
                if answer.status == 429:
                    self.stats.rate_limited += 1
                if answer.status not in RETRYABLE_STATUSES:
                    answer.latency_s = loop.time() - started
                    if answer.ok:
                        self.stats.tokens += used or 0
                        self.stats.latencies_s.append(answer.latency_s)
                    return answer
                last = answer
                advertised = _advertised_delay_s(answer.headers)
                delay = (
                    min(advertised, self.max_retry_after_s)
                    if advertised is not None
                    else self._backoff(attempt)
                )
                status = answer.status
            if attempt == self.max_attempts:
                break
            if deadline_s is not None and loop.time() + delay > started + deadline_s:
                break  # the retry would come too late for the caller: give up now
            self.stats.retries += 1
            retry = RetryEvent(status, loop.time(), advertised, delay)
            self.stats.retry_log.append(retry)
            self.stats.retrying += 1
            try:
                await self._sleep(delay)
            finally:
                self.stats.retrying -= 1
        assert last is not None
        raise RetriesExhausted(self.max_attempts, last)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return self._rng.uniform(0, cap)

    # -- local permits ---------------------------------------------------------------------

    async def _acquire(self, cost: int) -> list[tuple[TokenBucket, float]]:
        """A concurrency permit, then the buckets' charge; returns what was reserved."""
        loop = asyncio.get_running_loop()
        self.stats.waiting += 1
        try:
            async with self._cond:
                await self._cond.wait_for(lambda: self.stats.in_flight < self.concurrency_limit)
                self.stats.in_flight += 1
            try:
                async with self._bucket_line:
                    while True:  # the head of the line waits for the buckets' refill
                        now = loop.time()
                        held = self._costs(cost)
                        wait = max((b.wait_s(c, now) for b, c in held), default=0.0)
                        if wait <= 0:
                            for bucket, c in held:
                                bucket.reserve(c, now)
                            return held
                        await self._sleep(wait)
            except BaseException:
                async with self._cond:
                    self.stats.in_flight -= 1
                    self._cond.notify_all()
                raise
        finally:
            self.stats.waiting -= 1

    def _costs(self, tokens: int) -> list[tuple[TokenBucket, float]]:
        """(bucket, charge) for one request of about `tokens` tokens; a charge above a
        bucket's capacity is capped there, so a large request still goes, alone."""
        return [
            (b, 1.0 if name == "requests" else min(float(tokens), b.capacity))
            for name, b in self._buckets.items()
        ]

    async def _release(
        self,
        held: list[tuple[TokenBucket, float]],
        used: int | None,
        latency_s: float,
        overloaded: bool,
    ) -> None:
        """Settle the buckets with the real usage (the estimate where none is known) and
        adjust the concurrency limit."""
        now = asyncio.get_running_loop().time()
        requests = self._buckets.get("requests")
        for bucket, charged in held:
            real = charged if bucket is requests or used is None else min(used, bucket.capacity)
            bucket.settle(charged, real, now)
        if self._adaptive:
            if overloaded or self._slow(latency_s):
                self._aimd.overload(now)
            else:
                self._aimd.success()
        async with self._cond:
            self.stats.in_flight -= 1
            self._cond.notify_all()

    def _slow(self, latency_s: float) -> bool:
        self._best_latency_s = min(self._best_latency_s, latency_s)
        return latency_s > self.latency_factor * max(self._best_latency_s, 0.05)

    # -- learning from the server --------------------------------------------------------

    def _learn(self, headers: dict[str, str], now: float) -> None:
        if not self.learn_limits:
            return
        for name in ("requests", "tokens"):
            limit = _number(headers.get(f"x-ratelimit-limit-{name}"))
            if limit is None or limit <= 0:
                continue
            bucket = self._buckets.get(name)
            if bucket is not None and math.isclose(bucket.rate * 60, limit):
                continue
            bucket = self._set_bucket(name, limit, now)
            # Start from what the server says is left. Only then: the header describes the
            # moment this request was charged, so applying it later would count requests
            # in flight twice (the client holds their reservations already).
            remaining = _number(headers.get(f"x-ratelimit-remaining-{name}"))
            if remaining is not None:
                bucket.clip(remaining)

    def _set_bucket(self, name: str, per_minute: float, now: float = -math.inf) -> TokenBucket:
        """Create the bucket, or change its limit in place (open reservations stay on it)."""
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(per_minute, per_minute / 60.0, now)
        else:
            bucket.set_limit(per_minute, per_minute / 60.0, now)
        return bucket


def _check_positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 (got {value!r})")


def _response(resp: httpx.Response, attempt: int) -> Response:
    try:
        body: Any = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = resp.text
    headers = {k.lower(): v for k, v in resp.headers.items()}
    return Response(resp.status_code, headers, body, attempt, 0.0)  # latency: set when final


def _advertised_delay_s(headers: dict[str, str]) -> float | None:
    ms = _number(headers.get("retry-after-ms"))
    if ms is not None and ms >= 0:
        return ms / 1000
    seconds = _number(headers.get("retry-after"))
    if seconds is not None and seconds >= 0:
        return seconds
    return None


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _usage_total(body: Any) -> int | None:
    if not isinstance(body, dict):
        return None
    usage = body.get("usage")
    if isinstance(usage, dict) and type(usage.get("total_tokens")) is int:
        return int(usage["total_tokens"])
    return None
