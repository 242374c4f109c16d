"""Shared by the unit tests that drive the ASGI app against the fake upstream."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import uvloop

from tests.unit.fake_upstream import FakeVllm
from vllm_guard.config import CompiledConfig
from vllm_guard.engine.state import EngineState
from vllm_guard.proxy.app import GuardApp
from vllm_guard.upstream.connections import Upstream


@pytest_asyncio.fixture
async def fake():
    fake = FakeVllm()
    await fake.start()
    yield fake
    fake.release.set()
    await fake.stop()


def ready_app(config: CompiledConfig, fake: FakeVllm) -> GuardApp:
    engine = EngineState()
    engine.set("ready")
    return GuardApp(config, Upstream(fake.url, config.guard), engine)


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
