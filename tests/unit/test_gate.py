"""The asyncio gate with the loop's clock patched: no real sleeps."""

from __future__ import annotations

import asyncio

import pytest

from vllm_guard.core.admission import Admission
from vllm_guard.proxy.admission_gate import Gate, RefusalReason, Refused


class ManualClock:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = loop.time()
        loop.time = lambda: self.now  # type: ignore[method-assign]

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for _ in range(5):
            await asyncio.sleep(0)


@pytest.fixture
def gate(config):
    return Gate(Admission(config.max_num_seqs, config.classes))


async def test_waiter_times_out_at_max_wait(gate, config):
    inter = config.classes_by_name["interactive"]
    clock = ManualClock(asyncio.get_running_loop())
    held = [await gate.acquire(inter) for _ in range(4)]
    waiter = asyncio.ensure_future(gate.acquire(inter))
    await clock.advance(0)  # let it enter the queue at the current time
    await clock.advance(inter.max_wait_s - 0.1)
    assert not waiter.done()
    await clock.advance(0.2)
    with pytest.raises(Refused) as info:
        await waiter
    assert info.value.reason is RefusalReason.QUEUE_TIMEOUT
    assert 1.0 <= info.value.retry_after_s <= 60.0
    for t in held:
        gate.release(t)
    assert gate.admission.in_flight == 0


async def test_release_wakes_next_waiter(gate, config):
    batch = config.classes_by_name["batch"]
    held = [await gate.acquire(batch) for _ in range(3)]
    waiter = asyncio.ensure_future(gate.acquire(batch))
    await asyncio.sleep(0)
    gate.release(held[0])
    ticket = await asyncio.wait_for(waiter, 1)
    for t in (*held[1:], ticket):
        gate.release(t)
    assert gate.admission.in_flight == 0


async def test_cancel_in_the_same_turn_as_admission_returns_the_slot(gate, config):
    batch = config.classes_by_name["batch"]
    held = [await gate.acquire(batch) for _ in range(3)]
    waiter = asyncio.ensure_future(gate.acquire(batch))
    await asyncio.sleep(0)
    gate.release(held[0])  # admits the waiter...
    waiter.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.admission.in_flight == 2
    for t in held[1:]:
        gate.release(t)
    assert gate.admission.in_flight == 0


async def test_many_cancelled_waiters_leave_nothing(gate, config):
    batch = config.classes_by_name["batch"]
    held = [await gate.acquire(batch) for _ in range(3)]
    waiters = [asyncio.ensure_future(gate.acquire(batch)) for _ in range(5)]
    await asyncio.sleep(0)
    for w in waiters[::2]:
        w.cancel()
    await asyncio.sleep(0)
    assert gate.admission.statistics()[1].queued == 2
    for t in held:
        gate.release(t)
    admitted = [await w for w in waiters[1::2]]
    for t in admitted:
        gate.release(t)
    assert gate.admission.in_flight == 0 and gate.admission.statistics()[1].queued == 0
