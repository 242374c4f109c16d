"""Shared by the unit tests that drive the ASGI app against the fake upstream."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from typing import Any

import pytest
import pytest_asyncio
import uvloop

from tests.unit.fake_upstream import FakeVllm
from vllm_guard.config import CompiledConfig
from vllm_guard.engine.state import EngineState
from vllm_guard.proxy.app import GuardApp
from vllm_guard.proxy.clock import Clock
from vllm_guard.upstream.connections import Upstream


@pytest_asyncio.fixture
async def fake():
    fake = FakeVllm()
    await fake.start()
    yield fake
    fake.release.set()
    await fake.stop()


def ready_app(config: CompiledConfig, fake: FakeVllm, clock: Clock | None = None) -> GuardApp:
    engine = EngineState()
    engine.set("ready")
    return GuardApp(config, Upstream(fake.url, config.guard), engine, clock=clock)


class _Timer:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args, self.cancelled = when, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: _Timer) -> bool:
        return self.when < other.when


class ManualClock:
    """The request path's clock (vllm_guard.proxy.clock.Clock), moved by the test:
    `advance` runs the timers that fall due, in order, letting the loop run after each."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._timers: list[_Timer] = []

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> _Timer:
        timer = _Timer(when, callback, args)
        heapq.heappush(self._timers, timer)
        return timer

    async def advance(self, seconds: float) -> None:
        target = self._now + seconds
        while self._timers and self._timers[0].when <= target:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._now = max(self._now, timer.when)
                timer.callback(*timer.args)
                await _settle()
        self._now = target
        await _settle()


async def _settle() -> None:
    """Let woken tasks run (and the stand-in engine answer them)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def until(cond, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run a coroutine on the stdlib event loop and on uvloop (which the guard runs)."""

    def run(coro):
        if request.param == "uvloop":
            return uvloop.run(coro)
        return asyncio.run(coro)

    return run
