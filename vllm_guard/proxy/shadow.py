"""Shadow mode: a tenant's limits watched, not enforced (`shadow: true`).

`ShadowGate` wraps the tenant's own gate (the `TenantGate` protocol) and never makes a
request wait or refuses it. Its buckets are charged as enforcement would charge them, so
the refusals it counts are the ones enforcement would have made for the same traffic:

- a request the buckets admit is charged and settled as usual;
- one enforcement would refuse (its class rejects over a limit, or the wait would outlast
  `max_wait_s`) is served at once and charged nothing, as a refused request is not;
- one enforcement would make wait is served at once and charged now, into debt
  (`overdraw`, in-process or in Redis): refill pays the debt off exactly when the wait
  would have ended, so the requests behind it see what they would have seen. (While Redis
  cannot be reached, on the replica's local buckets under `on_store_down: local`.)

Each would-be refusal or delay is counted once per request (`on_shadow(dimension)`: the
`action="shadow"` series); the request carries the x-ratelimit-* headers it would have had.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm_guard.core.quota import (
    TOKENS_DAY,
    TOKENS_MINUTE,
    Denied,
    Limits,
    Reservation,
    Snapshot,
)
from vllm_guard.proxy.quota_gate import TenantGate, worth_waiting


class ShadowGate:
    def __init__(
        self, inner: TenantGate, on_shadow: Callable[[str], None], max_wait_s: float
    ) -> None:
        """`max_wait_s`: how long enforcement would let the tenant's requests wait for their
        budget (0 for a class that rejects over a limit)."""
        self.inner = inner
        self.on_shadow = on_shadow
        self.max_wait_s = max_wait_s
        self._overdrawn: set[Reservation] = set()  # counted already, until topped up or settled

    @property
    def limits(self) -> Limits:
        return self.inner.limits

    @property
    def waiting(self) -> int:
        return 0

    async def reserve(
        self, tokens: int, max_wait_s: float, max_waiting: int = 1000
    ) -> Reservation | Denied | object:
        result = await self.inner.reserve(tokens, 0.0, max_waiting)
        if not isinstance(result, Denied):
            return result  # a reservation; or DRAINED / STORE_DOWN, as for anyone
        self.on_shadow(result.dimension)
        if worth_waiting(result, max_wait_s):
            overdrawn = await self.inner.overdraw(tokens)
            if overdrawn is not None:
                self._overdrawn.add(overdrawn)
                return overdrawn
        return Reservation(self, tokens)  # served, charged nothing

    async def top_up(self, reservation: Reservation, tokens: int) -> bool:
        """Always True: the request is served whatever its counted prompt costs. Where the
        buckets cannot pay it now, enforcement would give the hold back and wait for the
        whole cost, or refuse it: a would-be delay is charged into debt, a would-be refusal
        gets its hold back whole. A request is counted once (not again here if its
        reservation was overdrawn)."""
        counted = reservation in self._overdrawn
        self._overdrawn.discard(reservation)
        if reservation.quota is self or reservation.settled:
            return True
        if await self.inner.top_up(reservation, tokens):
            return True
        if not counted:
            self.on_shadow(TOKENS_MINUTE if self.limits.tokens_per_minute else TOKENS_DAY)
        if not await self.inner.overdraw_top_up(reservation, tokens, self.max_wait_s):
            self.inner.settle(reservation, 0, sent=False)
        return True

    def settle(self, reservation: Reservation, used_tokens: int, sent: bool = True) -> None:
        self._overdrawn.discard(reservation)
        if reservation.quota is not self:
            self.inner.settle(reservation, used_tokens, sent)

    def snapshot(self) -> Snapshot:
        return self.inner.snapshot()

    def drain(self) -> None:
        self.inner.drain()

    def reconfigure(self, limits: Limits, on_store_down: str) -> None:
        self.inner.reconfigure(limits, on_store_down)

    async def overdraw(self, tokens: int) -> Reservation | None:
        return await self.inner.overdraw(tokens)

    async def overdraw_top_up(
        self, reservation: Reservation, tokens: int, max_wait_s: float
    ) -> bool:
        return await self.inner.overdraw_top_up(reservation, tokens, max_wait_s)
