"""The asyncio side of tenant quotas: `on_limit: wait` without polling.

One FIFO of waiting requests and one timer per tenant. The timer is armed for the moment
the head's buckets can pay (or the earliest deadline); a settle — a refund or a finished
request freeing a concurrency slot — wakes the queue too. A new request never overtakes
the tenant's waiting ones. Deadlines sit in a heap (a tenant's requests may belong to
classes with different `max_wait_s`), so a wake costs O(log n), not a scan of the queue:
a batch job with 20,000 waiting requests is the case this exists for.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

from vllm_guard.core.quota import CONCURRENCY, Denied, Limits, QuotaStore, Reservation, Snapshot
from vllm_guard.proxy.clock import Clock, LoopClock, TimerHandle


class _Waiter:
    __slots__ = ("deadline", "future", "tokens")

    def __init__(
        self, tokens: int, deadline: float, future: asyncio.Future[Reservation | Denied | object]
    ) -> None:
        self.tokens = tokens
        self.deadline = deadline
        self.future = future


DRAINED = object()
"""What `reserve` returns once the server drains: the request is refused (503)."""
STORE_DOWN = object()
"""What a shared store's `reserve` returns while it cannot be reached and the class's
`on_store_down` is `reject`: the request is refused (503)."""


class TenantGate(Protocol):
    """One tenant's quota as the request path sees it (`proxy/charge.py`, `generation.py`):
    `QuotaGate` over this process's buckets, or `SharedQuotaGate` over Redis."""

    @property
    def limits(self) -> Limits: ...

    @property
    def waiting(self) -> int: ...

    async def reserve(
        self, tokens: int, max_wait_s: float, max_waiting: int = 1000
    ) -> Reservation | Denied | object:
        """A reservation of `tokens`, possibly after waiting up to `max_wait_s`; the
        refusal (`Denied`); or `DRAINED` / `STORE_DOWN`."""
        ...

    async def top_up(self, reservation: Reservation, tokens: int) -> bool:
        """Add `tokens` to an open reservation now, or nothing (False)."""
        ...

    def settle(self, reservation: Reservation, used_tokens: int, sent: bool = True) -> None:
        """End a request: what it used (`sent=False`: the engine never saw it)."""
        ...

    def snapshot(self) -> Snapshot:
        """The numbers behind the x-ratelimit-* headers."""
        ...

    def drain(self) -> None: ...

    def reconfigure(self, limits: Limits, on_store_down: str) -> None:
        """New limits (a config reload): held reservations stay, buckets are clipped to
        lowered capacities and never refilled by the change; waiters are asked again."""
        ...

    async def overdraw(self, tokens: int) -> Reservation | None:
        """Charge one request whatever the buckets say — into debt, past the concurrency
        limit: shadow mode's charge for a request enforcement would have made wait, which
        refill pays off as that wait would have. None: nothing could be charged."""
        ...

    async def overdraw_top_up(
        self, reservation: Reservation, tokens: int, max_wait_s: float
    ) -> bool:
        """Add `tokens` to an open reservation, into debt, where the buckets could pay them
        within `max_wait_s` (shadow mode); False: nothing added."""
        ...


class QuotaGate:
    def __init__(
        self,
        quota: QuotaStore,
        on_delay: Callable[[str], None] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.quota = quota
        self._clock = clock or LoopClock()
        self.on_delay = on_delay  # told the dimension each time a request has to wait
        self._waiters: deque[_Waiter] = deque()  # arrival order; done ones dropped lazily
        self._deadlines: list[tuple[float, int, _Waiter]] = []  # heap; done ones dropped lazily
        self._seq = itertools.count()
        self._live = 0  # waiters whose future is not done
        self._timer: TimerHandle | None = None
        self.draining = False

    @property
    def waiting(self) -> int:
        return self._live

    @property
    def limits(self) -> Limits:
        return self.quota.limits

    def reconfigure(self, limits: Limits, on_store_down: str = "local") -> None:
        self.quota.reconfigure(limits, self._clock.now())
        self.wake()

    async def overdraw(self, tokens: int) -> Reservation | None:
        return self.quota.overdraw(tokens, self._clock.now())

    async def overdraw_top_up(
        self, reservation: Reservation, tokens: int, max_wait_s: float
    ) -> bool:
        now = self._clock.now()
        if self.quota.top_up_wait_s(reservation, tokens, now) > max_wait_s:
            return False
        self.quota.overdraw_top_up(reservation, tokens, now)
        return True

    async def top_up(self, reservation: Reservation, tokens: int) -> bool:
        return self.quota.top_up(reservation, tokens, self._clock.now())

    def snapshot(self) -> Snapshot:
        return self.quota.snapshot(self._clock.now())

    def refusal(self, tokens: int, max_wait_s: float, max_waiting: int = 1000) -> Denied | None:
        """The refusal `reserve` answers at once for a request of `tokens`, or None when it
        would be admitted or wait."""
        now = self._clock.now()
        denied = self.quota.check(tokens, now)
        if not self._live:
            if denied is not None and not worth_waiting(denied, max_wait_s):
                return denied
            return None
        if denied is not None and denied.retry_after_s == math.inf:
            return denied  # waiting cannot help
        if self._live >= max_waiting:
            return denied or self._head_denial(now)
        return None

    def drain(self) -> None:
        """The server stops: every waiter gets `DRAINED` now, and so does any new request."""
        self.draining = True
        self.answer_waiters(DRAINED)

    def answer_waiters(self, answer: object) -> None:
        """Every waiter gets `answer` now (the server drains; or, for a shared store's
        local buckets, Redis is back and they should wait there instead)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(answer)
                self._live -= 1

    async def reserve(
        self, tokens: int, max_wait_s: float, max_waiting: int = 1000
    ) -> Reservation | Denied | object:
        """A reservation, waiting up to `max_wait_s` for the buckets to allow it; or the
        refusal that still stands at the end (at once when waiting cannot help or
        `max_waiting` requests of the tenant already wait); or `DRAINED` when the server
        drains (at once, or as soon as the drain begins for a waiter)."""
        if self.draining:
            return DRAINED
        refused = self.refusal(tokens, max_wait_s, max_waiting)
        if refused is not None:
            return refused
        now = self._clock.now()
        if not self._live:
            result = self.quota.try_reserve(tokens, now)
            if isinstance(result, Reservation):
                return result
            denied: Denied | None = result
        else:
            denied = self.quota.check(tokens, now)
        if self.on_delay is not None:
            self.on_delay((denied or self._head_denial(now)).dimension)
        waiter = _Waiter(tokens, now + max_wait_s, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        heapq.heappush(self._deadlines, (waiter.deadline, next(self._seq), waiter))
        self._live += 1
        self._wake()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.cancelled():
                self._live -= 1  # its client left while it waited
            elif future.done():  # granted in the same loop turn as the cancel: give it back
                granted = future.result()
                if isinstance(granted, Reservation):
                    self.settle(granted, 0, sent=False)
            raise

    def _head_denial(self, now: float) -> Denied:
        """Why the queue is stuck: the first live waiter's refusal."""
        for w in self._waiters:
            if not w.future.done():
                denied = self.quota.check(w.tokens, now)
                if denied is not None:
                    return denied
        return Denied(CONCURRENCY, self.quota.limits.max_concurrent or 0, 0.0)

    def settle(self, reservation: Reservation, used_tokens: int, sent: bool = True) -> None:
        """End one of this tenant's requests on its quota now (see `QuotaStore.settle`;
        `sent=False` gives a hold back whole) and let in the waiters a refund admits."""
        self.quota.settle(reservation, used_tokens, self._clock.now(), sent=sent)
        self.wake()

    def wake(self) -> None:
        """Let in the waiters the buckets admit now (after a change made elsewhere)."""
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._clock.now()
        next_at = math.inf
        blocked: Denied | None = None
        waiters = self._waiters
        while waiters:
            head = waiters[0]
            if head.future.done():  # cancelled by its client
                waiters.popleft()
                continue
            result = self.quota.try_reserve(head.tokens, now)
            # Admitted; or refused for good (too large since a reload lowered a limit).
            if isinstance(result, Reservation) or result.retry_after_s == math.inf:
                waiters.popleft()
                head.future.set_result(result)
                self._live -= 1
                continue
            blocked = result
            if result.dimension != CONCURRENCY:
                next_at = now + result.retry_after_s
            break
        deadlines = self._deadlines
        while deadlines:
            deadline, _, w = deadlines[0]
            if w.future.done():
                heapq.heappop(deadlines)
                continue
            if deadline > now:
                next_at = min(next_at, deadline)
                break
            heapq.heappop(deadlines)
            # Still refused at its deadline: on its own dimensions, or behind the head.
            denied = self.quota.check(w.tokens, now) or blocked
            assert denied is not None
            w.future.set_result(denied)
            self._live -= 1
        if next_at < math.inf:
            self._timer = self._clock.call_at(next_at, self._wake)


def worth_waiting(denied: Denied, max_wait_s: float) -> bool:
    """Whether waiting up to `max_wait_s` can turn `denied` into a reservation."""
    if denied.dimension == CONCURRENCY:
        return max_wait_s > 0
    return denied.retry_after_s <= max_wait_s
