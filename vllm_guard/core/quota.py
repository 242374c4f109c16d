"""Tenant quotas: token buckets and a concurrency count, reserved up front, settled after.

Synchronous and free of I/O; `now` (seconds, monotonic) is passed in, so tests run on a
manual clock.

A request is charged its estimate on every dimension at once, all or nothing: if one
bucket cannot pay, none is touched. When the request ends it is settled with what it
really used — the unused part of the estimate goes back, an overrun is charged — so each
bucket keeps its promise in every window: over any interval of length T, the requests
admitted in it, and equally the requests that finish in it, used at most
`capacity + rate * T` (see `TokenBucket`).

A bucket may go below zero when a request used more than it was charged (an estimate
that was too low); that debt is paid off by refill before anything else is admitted,
which is what keeps the promise over the windows that include the overrun.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

REQUESTS = "requests_per_minute"
TOKENS_MINUTE = "tokens_per_minute"
TOKENS_DAY = "tokens_per_day"
CONCURRENCY = "max_concurrent"

PERIOD_S = {REQUESTS: 60.0, TOKENS_MINUTE: 60.0, TOKENS_DAY: 86400.0}


class TokenBucket:
    """Capacity `capacity`, refilled continuously at `rate` per second.

    What a request reserves stays `reserved` until it is settled, and refill stops at
    `capacity - reserved`: available plus held back never exceeds the capacity. Settling
    returns the unused part and takes the used part for good, so everything used —
    counted when it is settled, or when it was reserved — comes out of one budget that
    holds at most `capacity` and grows by at most `rate * T` in any time T. That is the
    bucket's promise on the engine's side: however long each request runs, the work
    that *finishes* in any interval stays within `capacity + rate * T`. The price is
    that a reservation larger than what is used holds capacity while its request runs.
    """

    __slots__ = ("capacity", "level", "rate", "reserved", "updated")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self.reserved = 0.0
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            room = self.capacity - self.reserved
            grown = self.level + (now - self.updated) * self.rate
            self.level = max(self.level, min(room, grown))
            self.updated = now

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until `cost` can be paid (0 if it can now; inf if it never can).

        When reservations hold back part of the capacity, refill alone may never reach
        `cost`; the answer is then the earliest time, reached if they are settled by then."""
        self.refill(now)
        if cost <= self.level:
            return 0.0
        if cost > self.capacity:
            return math.inf
        return (cost - self.level) / self.rate

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again (if its open reservations are settled by
        then, as in `wait_s`)."""
        self.refill(now)
        return (self.capacity - self.level) / self.rate

    def reserve(self, cost: float, now: float) -> None:
        self.refill(now)
        self.level -= cost
        self.reserved += cost

    def set_limit(self, capacity: float, rate: float, now: float) -> None:
        """Change the limit in place: open reservations stay, and the level is clipped so
        that it and they fit the new capacity (below zero where they alone exceed it: new
        requests wait until they are settled or refill pays it), never raised."""
        self.refill(now)
        self.capacity = capacity
        self.rate = rate
        self.level = min(self.level, capacity - self.reserved)

    def clip(self, level: float) -> None:
        """Lower the level to `level` if it is above (e.g. what a server says is left)."""
        self.level = min(self.level, level)

    def settle(self, reserved: float, used: float, now: float) -> None:
        """End a reservation of `reserved` that used `used`; using more than was reserved
        is taken too, possibly into debt, which refill pays off before anything else."""
        self.refill(now)
        self.reserved = max(0.0, self.reserved - reserved)
        self.level += reserved - used


@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant's limits; None means unlimited on that dimension."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    tokens_per_day: float | None = None
    max_concurrent: int | None = None
    burst: Mapping[str, float] | None = None
    """Bucket capacity per dimension where it differs from the limit."""

    @property
    def counts_tokens(self) -> bool:
        return self.tokens_per_minute is not None or self.tokens_per_day is not None

    def dimensions(self) -> list[str]:
        """The dimensions this tenant is limited on."""
        dims = [REQUESTS, TOKENS_MINUTE, TOKENS_DAY, CONCURRENCY]
        return [d for d in dims if getattr(self, d) is not None]

    @property
    def empty(self) -> bool:
        return (
            self.requests_per_minute is None
            and not self.counts_tokens
            and self.max_concurrent is None
        )


class Denied(NamedTuple):
    """A dimension that refused, its limit, and when to retry (inf: the request never fits)."""

    dimension: str
    limit: float
    retry_after_s: float


Buckets = tuple[tuple[str, TokenBucket], ...]
"""A tenant's buckets by dimension, as one immutable value (a reservation keeps it)."""


class Reservation:
    """What a request was charged; settle it exactly once. `quota`: the store that holds it
    (a shared store's requests may fall back to local buckets); `id`: its name in a shared
    store; `buckets`: the buckets it was charged on (a reload may add or drop some since:
    it is settled on exactly these)."""

    __slots__ = ("buckets", "id", "quota", "settled", "tokens")

    def __init__(
        self, quota: object, tokens: int, id: str = "", buckets: Buckets | None = None
    ) -> None:
        self.quota = quota
        self.tokens = tokens
        self.settled = False
        self.id = id
        self.buckets = buckets


class Snapshot(NamedTuple):
    """The numbers behind the x-ratelimit-* headers."""

    limit_requests: float | None
    remaining_requests: int
    reset_requests_s: float
    limit_tokens: float | None
    remaining_tokens: int
    reset_tokens_s: float


class QuotaStore(Protocol):
    """Where a tenant's buckets and concurrency live. `TenantQuota` keeps them in this
    process; a shared store (Redis, across guard replicas) is the other implementation.
    The asyncio side (`proxy/quota_gate.py`) and the app use only this."""

    limits: Limits
    in_flight: int

    def check(self, tokens: int, now: float) -> Denied | None: ...

    def try_reserve(self, tokens: int, now: float) -> Reservation | Denied: ...

    def top_up(self, reservation: Reservation, tokens: int, now: float) -> bool: ...

    def settle(
        self, reservation: Reservation, used_tokens: int, now: float, sent: bool = True
    ) -> None: ...

    def snapshot(self, now: float) -> Snapshot: ...

    def reconfigure(self, limits: Limits, now: float) -> None: ...

    def overdraw(self, tokens: int, now: float) -> Reservation: ...

    def overdraw_top_up(self, reservation: Reservation, tokens: int, now: float) -> None: ...

    def top_up_wait_s(self, reservation: Reservation, tokens: int, now: float) -> float: ...


class TenantQuota:
    """A `QuotaStore` in this process's memory."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.buckets: dict[str, TokenBucket] = {}
        self._charged: Buckets = ()
        self.in_flight = 0
        self.reconfigure(limits, now)

    def reconfigure(self, limits: Limits, now: float) -> None:
        """New limits (a config reload): a bucket whose dimension stays keeps its state and
        its open reservations, clipped to its new capacity and never refilled by the change;
        a new dimension's bucket starts full; a dropped one is gone (requests charged on it
        settle there, harmlessly). The concurrency count stays."""
        burst = limits.burst or {}
        buckets: dict[str, TokenBucket] = {}
        for dim in (REQUESTS, TOKENS_MINUTE, TOKENS_DAY):
            limit = getattr(limits, dim)
            if limit is None:
                continue
            capacity, rate = burst.get(dim, limit), limit / PERIOD_S[dim]
            bucket = self.buckets.get(dim)
            if bucket is None:
                bucket = TokenBucket(capacity, rate, now)
            else:
                bucket.set_limit(capacity, rate, now)
            buckets[dim] = bucket
        self.limits = limits
        self.buckets = buckets
        self._charged = tuple(buckets.items())

    def _costs(
        self, tokens: int, charged: Buckets | None = None
    ) -> list[tuple[str, TokenBucket, float]]:
        return [
            (dim, bucket, 1.0 if dim == REQUESTS else float(tokens))
            for dim, bucket in (self._charged if charged is None else charged)
        ]

    def check(self, tokens: int, now: float) -> Denied | None:
        """Why a request of `tokens` estimated tokens cannot be charged now, or None.

        The dimension reported is the one that frees up last, so retrying after its
        `retry_after_s` finds every dimension able to pay (if nothing else was charged
        meanwhile). A request larger than a bucket's capacity gets `retry_after_s = inf`,
        whatever the other dimensions say."""
        worst: Denied | None = None
        for dim, bucket, cost in self._costs(tokens):
            wait = bucket.wait_s(cost, now)
            if wait > 0 and (worst is None or wait > worst.retry_after_s):
                worst = Denied(dim, getattr(self.limits, dim), wait)
        cap = self.limits.max_concurrent
        if cap is not None and self.in_flight >= cap and worst is None:
            worst = Denied(CONCURRENCY, cap, 0.0)  # frees when one of its requests ends
        return worst

    def try_reserve(self, tokens: int, now: float) -> Reservation | Denied:
        """Charge one request on every dimension at once, or on none (see `check`)."""
        denied = self.check(tokens, now)
        if denied is not None:
            return denied
        return self.overdraw(tokens, now)

    def overdraw(self, tokens: int, now: float) -> Reservation:
        """Charge one request whether or not the buckets can pay (into debt, past the
        concurrency limit): shadow mode's charge for a request enforcement would have made
        wait, which refill then pays off as that wait would have."""
        for _, bucket, cost in self._costs(tokens):
            bucket.reserve(cost, now)
        self.in_flight += 1
        return Reservation(self, tokens, buckets=self._charged)

    def top_up(self, reservation: Reservation, tokens: int, now: float) -> bool:
        """Add `tokens` to an open reservation on every token bucket at once, or on none
        (False: some bucket cannot pay them now). The request was counted already."""
        costs = self._token_costs(reservation, tokens)
        if any(bucket.wait_s(cost, now) > 0 for bucket, cost in costs):
            return False
        self.overdraw_top_up(reservation, tokens, now)
        return True

    def top_up_wait_s(self, reservation: Reservation, tokens: int, now: float) -> float:
        """Seconds until the token buckets `reservation` was charged on could pay `tokens`
        more (inf: never)."""
        costs = self._token_costs(reservation, tokens)
        return max((bucket.wait_s(cost, now) for bucket, cost in costs), default=0.0)

    def overdraw_top_up(self, reservation: Reservation, tokens: int, now: float) -> None:
        """`top_up` whether or not the buckets can pay (shadow mode; see `overdraw`)."""
        for bucket, cost in self._token_costs(reservation, tokens):
            bucket.reserve(cost, now)
        reservation.tokens += tokens

    def _token_costs(
        self, reservation: Reservation, tokens: int
    ) -> list[tuple[TokenBucket, float]]:
        charged = self._costs(tokens, reservation.buckets)
        return [(b, c) for d, b, c in charged if d != REQUESTS]

    def settle(
        self, reservation: Reservation, used_tokens: int, now: float, sent: bool = True
    ) -> None:
        """End a request that used `used_tokens` (prompt + completion): refund what it
        did not use, charge what it used beyond its estimate. A request the engine never
        saw (`sent=False`: refused while queued, engine down) is refunded entirely, the
        request itself included; a sent one stays counted as a request."""
        if reservation.settled:
            return
        reservation.settled = True
        self.in_flight -= 1
        used = used_tokens if sent else 0
        for dim, bucket, cost in self._costs(reservation.tokens, reservation.buckets):
            if dim == REQUESTS:
                bucket.settle(cost, 1.0 if sent else 0.0, now)
            else:
                bucket.settle(cost, float(used), now)

    def snapshot(self, now: float) -> Snapshot:
        req = self.buckets.get(REQUESTS)
        tok = self.buckets.get(TOKENS_MINUTE) or self.buckets.get(TOKENS_DAY)
        return Snapshot(
            self.limits.requests_per_minute,
            _remaining(req, now),
            req.reset_s(now) if req else 0.0,
            (self.limits.tokens_per_minute or self.limits.tokens_per_day) if tok else None,
            _remaining(tok, now),
            tok.reset_s(now) if tok else 0.0,
        )


def _remaining(bucket: TokenBucket | None, now: float) -> int:
    if bucket is None:
        return 0
    bucket.refill(now)
    return max(0, math.floor(bucket.level))


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it: `1s`, `6m0s`, `1h2m3s`,
    `120ms` below a second (rounded up, so a client waiting that long finds room)."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
