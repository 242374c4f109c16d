"""The asyncio side of on_limit: wait, on a manual clock (no real sleeps)."""

from __future__ import annotations

import asyncio
import random

from tests.unit.conftest import ManualClock
from vllm_guard.core.quota import Denied, Limits, Reservation, TenantQuota
from vllm_guard.proxy.quota_gate import QuotaGate


async def test_many_waiters_cancels_and_expiries_keep_the_count_exact():
    rng = random.Random(3)
    clock = ManualClock()
    gate = QuotaGate(TenantQuota(Limits(max_concurrent=1), now=0.0), clock=clock)
    holder = await gate.reserve(1, max_wait_s=5)
    assert isinstance(holder, Reservation)
    # 300 waiters; a third of them with a deadline that passes while they wait.
    tasks = [
        asyncio.create_task(gate.reserve(1, max_wait_s=0.05 if i % 3 == 0 else 5))
        for i in range(300)
    ]
    await asyncio.sleep(0)
    assert gate.waiting == 300
    for t in rng.sample(tasks, 60):
        t.cancel()
    await clock.advance(0.1)  # the short deadlines pass: those get a refusal
    granted = 0
    current = holder
    while True:
        gate.settle(current, 1)
        await asyncio.sleep(0)
        nxt = _open_grant(tasks)
        if nxt is None:
            break
        current = nxt
        granted += 1
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    refused = sum(isinstance(r, Denied) for r in results)
    assert cancelled == 60
    assert granted + refused + cancelled == 300
    assert refused >= 1 and granted >= 1
    assert gate.waiting == 0
    assert gate.quota.in_flight == 0


def _open_grant(tasks: list[asyncio.Task]) -> Reservation | None:
    """A reservation some waiter was granted and nobody has settled yet."""
    for t in tasks:
        if t.done() and not t.cancelled():
            r = t.result()
            if isinstance(r, Reservation) and not r.settled:
                return r
    return None


async def test_a_full_queue_refuses_at_once():
    gate = QuotaGate(TenantQuota(Limits(max_concurrent=1), now=0.0))
    holder = await gate.reserve(1, max_wait_s=5)
    assert isinstance(holder, Reservation)
    waiters = [asyncio.create_task(gate.reserve(1, 5, max_waiting=2)) for _ in range(2)]
    await asyncio.sleep(0)
    refused = await gate.reserve(1, 5, max_waiting=2)
    assert isinstance(refused, Denied)
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert gate.waiting == 0
