"""One tenant's quota in the shared (Redis) store, as the request path sees it.

The same contract as `proxy/quota_gate.QuotaGate` (the `TenantGate` protocol): a request
reserves at once, or waits in the tenant's FIFO for up to its class's `max_wait_s`, or is
refused. What differs is where the buckets live: every replica charges the same ones, so a
release on another replica is news only when Redis is asked again — the head of the queue
asks again after the wait the script names, at most `POLL_S` later (a concurrency slot
has no refill time), and at once when a request of this replica settles.

While Redis cannot be reached, the tenant's class decides (`on_store_down`): `reject`
answers 503 with retry-after; `local` charges this replica's own buckets at the limit
divided by `guard.replicas`, so the replicas together stay within the limit. The switch
keeps the promise both ways:

- into local: the local buckets start at this replica's share of the level Redis last
  reported, hold back from refill what this replica's running requests reserved in Redis
  (as Redis did), and count them against the local concurrency share;
- back to Redis (before it counts as up again, `RedisQuotaStore.before_up`): the running
  requests the local buckets admitted become reservations with leases in Redis, and what
  the finished ones used is charged there; a Redis that lost its data is seeded from the
  local levels times the replicas, not refilled.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Literal

from vllm_guard.core.quota import (
    CONCURRENCY,
    REQUESTS,
    TOKENS_DAY,
    TOKENS_MINUTE,
    Buckets,
    Denied,
    Limits,
    Reservation,
    Snapshot,
    TenantQuota,
)
from vllm_guard.limits.redis_store import RedisQuotaStore, StoreDown, remaining_and_reset
from vllm_guard.proxy.clock import Clock, LoopClock
from vllm_guard.proxy.quota_gate import DRAINED, STORE_DOWN, QuotaGate, worth_waiting

POLL_S = 0.05
"""Longest a waiting head goes without asking Redis again (others' releases are unseen)."""

_UNREACHABLE = object()  # a waiter's answer when Redis went away while it waited
_BACK = object()  # a local waiter's answer when Redis came back while it waited

OnStoreDown = Literal["reject", "local"]


class _Waiter:
    __slots__ = ("deadline", "future", "tokens")

    def __init__(self, tokens: int, deadline: float, future: asyncio.Future[object]) -> None:
        self.tokens = tokens
        self.deadline = deadline
        self.future = future


class SharedQuotaGate:
    def __init__(
        self,
        store: RedisQuotaStore,
        tenant: str,
        limits: Limits,
        on_store_down: OnStoreDown,
        replicas: int,
        on_delay: Callable[[str], None] | None = None,
        on_fallback: Callable[[OnStoreDown], None] | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`on_delay(dimension)`: a request has to wait; `on_fallback(posture)`: a request
        was decided by `on_store_down` because Redis could not be reached."""
        self.store = store
        self.tenant = tenant
        self.keys = store.keys_for(tenant, limits)
        self._limits = limits
        self.posture = on_store_down
        self._clock = clock or LoopClock()
        self._replicas = replicas
        self._local_quota = TenantQuota(split_limits(limits, replicas), 0.0)
        self.local = QuotaGate(self._local_quota, on_delay, clock)
        self._on_local = False  # charging local buckets since Redis went away
        self._open: dict[str, int] = {}  # this replica's open Redis reservations: id -> tokens
        self._held: dict[str, int] = {}  # of those, the ones the local buckets hold back
        self._held_buckets: Buckets = ()
        self._local_open: set[Reservation] = set()  # served on local buckets, running
        self._adopted: dict[Reservation, str] = {}  # of those, now reservations in Redis
        self._used_locally = (0, 0)  # requests, tokens local requests used while down
        self._seed_next: tuple[float, ...] = ()
        store.before_up(self._leave_local)
        self.on_delay = on_delay
        self.on_fallback = on_fallback
        self._levels: tuple[float, ...] | None = None  # the buckets as Redis last said
        self._waiters: deque[_Waiter] = deque()
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._seq = itertools.count()
        self._live = 0
        self._last_denied: Denied | None = None
        self._pump: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self.draining = False

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def waiting(self) -> int:
        return self._live + self.local.waiting

    def reconfigure(self, limits: Limits, on_store_down: str) -> None:
        """New limits (a config reload), from this replica's next call on. Redis keeps each
        running request's reservation on the dimensions it was charged on (the script
        records them), so a dimension added or dropped never leaves a hold or a refund
        behind; its buckets are clipped to a lowered capacity, never refilled."""
        if limits != self._limits:
            self.keys = self.store.keys_for(self.tenant, limits)
            self._levels = None  # they were in the old dimensions' order
            self._seed_next = ()
            self._local_quota.reconfigure(split_limits(limits, self._replicas), self._clock.now())
            self._limits = limits
        self.posture = "reject" if on_store_down == "reject" else "local"
        self._kick.set()  # the head asks again under the new limits

    # -- reserve ----------------------------------------------------------------------------

    async def reserve(
        self, tokens: int, max_wait_s: float, max_waiting: int = 1000
    ) -> Reservation | Denied | object:
        if self.draining:
            return DRAINED
        if not self.store.up:
            return await self._without_store(tokens, max_wait_s, max_waiting)
        now = self._clock.now()
        if not self._live:
            try:
                result = await self._try(tokens)
            except StoreDown:
                return await self._without_store(tokens, max_wait_s, max_waiting)
            if isinstance(result, Reservation):
                return result
            if not worth_waiting(result, max_wait_s):
                return result
            denied: Denied = result
        elif self._live >= max_waiting:
            return self._head_denial()
        else:
            denied = self._head_denial()
        if self.on_delay is not None:
            self.on_delay(denied.dimension)
        waiter = _Waiter(tokens, now + max_wait_s, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        heapq.heappush(self._deadlines, (waiter.deadline, next(self._seq), waiter))
        self._live += 1
        if self._pump is None:
            self._pump = asyncio.create_task(self._run_queue())
        try:
            answer = await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.cancelled():
                self._live -= 1  # its client left while it waited
            elif future.done() and isinstance(future.result(), Reservation):
                granted = future.result()
                assert isinstance(granted, Reservation)
                self.settle(granted, 0, sent=False)  # granted as it was cancelled
            raise
        if answer is _UNREACHABLE:
            left_s = max(0.0, waiter.deadline - self._clock.now())
            return await self._without_store(tokens, left_s, max_waiting)
        return answer

    async def _try(self, tokens: int) -> Reservation | Denied:
        """Reserve in Redis; a single late answer (the store still counts as up) is asked
        again once, so one slow moment does not send requests to the local buckets."""
        try:
            return await self._try_once(tokens)
        except StoreDown:
            if not self.store.up:
                raise
            return await self._try_once(tokens)

    async def _try_once(self, tokens: int, overdraw: bool = False) -> Reservation | Denied:
        """One reserve in Redis (`overdraw`: whatever the buckets say; always granted)."""
        rid = self.store.new_id()
        self._leave_local()
        reply = await self.store.reserve(self.keys, rid, tokens, self._seed_next, overdraw)
        self._seed_next = ()
        self._levels = reply.levels
        if reply.granted:
            # Counted locally too: if Redis goes away, this replica's own concurrency share
            # starts with the requests it is already running.
            self._local_quota.in_flight += 1
            self._open[rid] = tokens
            return Reservation(self, tokens, rid)
        assert reply.denied is not None
        return reply.denied

    async def _without_store(
        self, tokens: int, max_wait_s: float, max_waiting: int
    ) -> Reservation | Denied | object:
        if self.on_fallback is not None:
            self.on_fallback(self.posture)
        if self.posture == "reject":
            return STORE_DOWN
        self._go_local()
        deadline = self._clock.now() + max_wait_s
        result = await self.local.reserve(tokens, max_wait_s, max_waiting)
        if result is _BACK:  # Redis answers again: wait there for what is left of the wait
            try:
                async with asyncio.timeout(max(0.0, deadline - self._clock.now())):
                    await self.store.wait_up()  # its catch-up is being sent
            except TimeoutError:
                return await self._without_store(tokens, 0.0, max_waiting)
            left_s = max(0.0, deadline - self._clock.now())
            return await self.reserve(tokens, left_s, max_waiting)
        if isinstance(result, Denied) and result.retry_after_s == math.inf:
            return STORE_DOWN  # too large for this replica's share only: not the client's fault
        if isinstance(result, Reservation):
            if self._on_local:
                self._local_open.add(result)
            else:  # admitted locally just as Redis came back: Redis takes it over now
                rid = self.store.new_id()
                self._adopted[result] = rid
                self._open[rid] = result.tokens
                self.store.catch_up_later(self.keys, (), 0, 0, [(rid, result.tokens)])
        return result

    def _go_local(self) -> None:
        """Charge the local buckets from now on (Redis cannot be reached)."""
        if not self._on_local:
            self._on_local = True
            self._start_local()

    def _leave_local(self) -> None:
        """Redis answers again: tell it what this tenant's local buckets did — what their
        finished requests used, and their running requests, which become reservations
        there with leases (their settles go to Redis) — and end the local hold on requests
        admitted through Redis. Called before anything else reaches Redis
        (`RedisQuotaStore.before_up`), and from `_try`."""
        if not self._on_local:
            return
        self._on_local = False
        self._seed_next = self._seed()
        running = []
        for r in self._local_open:
            rid = self.store.new_id()
            self._adopted[r] = rid
            self._open[rid] = r.tokens
            running.append((rid, r.tokens))
        self._local_open.clear()
        requests, tokens = self._used_locally
        self._used_locally = (0, 0)
        self.store.catch_up_later(self.keys, self._seed_next, requests, tokens, running)
        for held in list(self._held):
            self._release_hold(held)
        # Requests still waiting for the local buckets wait for Redis's from now on: local
        # buckets admit nothing while Redis answers.
        self.local.answer_waiters(_BACK)

    def _start_local(self) -> None:
        """The local buckets take over where the shared ones were last seen (this replica's
        share of them): the replicas together do not start the outage with a fresh burst.
        What this replica's running requests reserved in Redis stays held back from the
        local buckets' refill until they end, as Redis held it back: the promise holds at
        completion across the switch."""
        now = self._clock.now()
        if self._levels is not None:
            for (dim, _, _), level in zip(self.keys.dimensions, self._levels, strict=True):
                bucket = self._local_quota.buckets[dim]
                bucket.refill(now)
                bucket.clip(level / self._replicas)
        self._held = dict(self._open)
        # The buckets that take the holds (a reload may add one before they are released).
        self._held_buckets = tuple(self._local_quota.buckets.items())
        for dim, bucket in self._held_buckets:
            bucket.refill(now)
            bucket.reserved += len(self._held) if dim == REQUESTS else sum(self._held.values())

    def _release_hold(self, rid: str) -> None:
        tokens = self._held.pop(rid, None)
        if tokens is None:
            return
        now = self._clock.now()
        for dim, bucket in self._held_buckets:
            bucket.refill(now)
            bucket.reserved = max(0.0, bucket.reserved - (1 if dim == REQUESTS else tokens))

    def _seed(self) -> tuple[float, ...]:
        """For a Redis that comes back empty: each bucket at this replica's local level
        times the replicas (their estimate of what is left), not full."""
        now = self._clock.now()
        seed = []
        for dim, capacity, _ in self.keys.dimensions:
            bucket = self._local_quota.buckets[dim]
            bucket.refill(now)
            seed.append(min(capacity, bucket.level * self._replicas))
        return tuple(seed)

    def _head_denial(self) -> Denied:
        return self._last_denied or Denied(CONCURRENCY, self._limits.max_concurrent or 0, 0.0)

    async def _run_queue(self) -> None:
        """Admit the tenant's waiters in arrival order, asking Redis for the head; answer
        each waiter that reaches its deadline with the refusal that still stands."""
        try:
            while self._live:
                now = self._clock.now()
                self._expire(now)
                head = self._first_live()
                if head is None:
                    break
                try:
                    result = await self._try(head.tokens)
                except StoreDown:
                    if self.store.up:
                        continue  # one late answer: ask again
                    self._all_unreachable()
                    break
                if head.future.done():  # its client left while Redis was asked
                    if isinstance(result, Reservation):
                        self.settle(result, 0, sent=False)
                    continue
                if isinstance(result, Reservation) or result.retry_after_s == math.inf:
                    self._waiters.popleft()
                    head.future.set_result(result)
                    self._live -= 1
                    continue
                self._last_denied = result
                wait_s = min(result.retry_after_s, POLL_S) if result.retry_after_s else POLL_S
                if self._deadlines:
                    wait_s = min(wait_s, self._deadlines[0][0] - now)
                self._kick.clear()
                try:
                    async with asyncio.timeout(max(0.0, wait_s)):
                        await self._kick.wait()
                except TimeoutError:
                    pass
        finally:
            self._pump = None

    def _first_live(self) -> _Waiter | None:
        while self._waiters:
            if not self._waiters[0].future.done():
                return self._waiters[0]
            self._waiters.popleft()
        return None

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and (deadlines[0][2].future.done() or deadlines[0][0] <= now):
            _, _, w = heapq.heappop(deadlines)
            if not w.future.done():
                w.future.set_result(self._head_denial())
                self._live -= 1

    def _all_unreachable(self) -> None:
        for w in self._waiters:
            if not w.future.done():
                w.future.set_result(_UNREACHABLE)
        self._waiters.clear()
        self._deadlines.clear()
        self._live = 0

    # -- shadow mode ------------------------------------------------------------------------

    async def overdraw(self, tokens: int) -> Reservation | None:
        """Charge one request in Redis whatever the buckets say (see `TenantGate`). While
        Redis cannot be reached, on this replica's local buckets as a request they admit
        (posture `local`; None under `reject`, which serves no one meanwhile)."""
        if self.store.up:
            try:
                charged = await self._try_once(tokens, overdraw=True)
            except StoreDown:
                pass
            else:
                assert isinstance(charged, Reservation), charged
                return charged
        if self.posture == "reject":
            return None
        self._go_local()
        overdrawn = await self.local.overdraw(tokens)
        if overdrawn is not None:
            self._local_open.add(overdrawn)  # charged to Redis when it answers again
        return overdrawn

    async def overdraw_top_up(
        self, reservation: Reservation, tokens: int, max_wait_s: float
    ) -> bool:
        if reservation.quota is not self:
            return await self.local.overdraw_top_up(reservation, tokens, max_wait_s)
        return await self._top_up(reservation, tokens, max_wait_s)

    # -- the rest of the contract -------------------------------------------------------------

    async def top_up(self, reservation: Reservation, tokens: int) -> bool:
        if reservation.quota is not self:
            return await self.local.top_up(reservation, tokens)
        return await self._top_up(reservation, tokens)

    async def _top_up(
        self, reservation: Reservation, tokens: int, overdraw_within_s: float | None = None
    ) -> bool:
        """A top-up of a reservation in Redis (into debt within `overdraw_within_s`)."""
        try:
            reply = await self.store.top_up(self.keys, reservation.id, tokens, overdraw_within_s)
        except StoreDown:
            return False
        self._levels = reply.levels
        if reply.granted:
            reservation.tokens += tokens
            if reservation.id in self._open:
                self._open[reservation.id] += tokens
        return reply.granted

    def settle(self, reservation: Reservation, used_tokens: int, sent: bool = True) -> None:
        if reservation.settled:
            return
        if reservation.quota is not self:  # served on this replica's own buckets
            self.local.settle(reservation, used_tokens, sent)
            self._local_open.discard(reservation)
            adopted = self._adopted.pop(reservation, None)
            if adopted is not None:  # a reservation in Redis since it came back
                self._open.pop(adopted, None)
                self._release_hold(adopted)
                self.store.settle_soon(self.keys, adopted, used_tokens, sent, self._kick.set)
            elif sent:  # for the catch-up when Redis answers again
                requests, tokens = self._used_locally
                self._used_locally = (requests + 1, tokens + used_tokens)
            return
        reservation.settled = True
        self._local_quota.in_flight -= 1
        self._open.pop(reservation.id, None)
        self._release_hold(reservation.id)
        self.local.wake()  # a request waiting on the local share may fit now
        self.store.settle_soon(self.keys, reservation.id, used_tokens, sent, self._kick.set)

    def snapshot(self) -> Snapshot:
        if not self.store.up:
            return self.local.snapshot()
        keys, lim = self.keys, self._limits
        levels = self._levels or tuple(cap for _, cap, _ in keys.dimensions)
        req_left, req_reset = remaining_and_reset(keys, levels, REQUESTS)
        tok_dim = TOKENS_MINUTE if lim.tokens_per_minute is not None else TOKENS_DAY
        tok_left, tok_reset = remaining_and_reset(keys, levels, tok_dim)
        return Snapshot(
            lim.requests_per_minute,
            req_left,
            req_reset,
            lim.tokens_per_minute or lim.tokens_per_day,
            tok_left,
            tok_reset,
        )

    def drain(self) -> None:
        self.draining = True
        for w in self._waiters:
            if not w.future.done():
                w.future.set_result(DRAINED)
        self._waiters.clear()
        self._deadlines.clear()
        self._live = 0
        self.local.drain()


def split_limits(limits: Limits, replicas: int) -> Limits:
    """Each replica's share of a limit while Redis is down: rates and capacities divided by
    `replicas`; concurrency too, rounded down but at least 1."""
    if replicas <= 1:
        return limits

    def part(value: float | None) -> float | None:
        return None if value is None else value / replicas

    burst = {dim: cap / replicas for dim, cap in (limits.burst or {}).items()}
    cap = limits.max_concurrent
    return Limits(
        part(limits.requests_per_minute),
        part(limits.tokens_per_minute),
        part(limits.tokens_per_day),
        None if cap is None else max(1, cap // replicas),
        burst or None,
    )
