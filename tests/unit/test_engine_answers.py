"""Every reader of what the engine says, fed answers a healthy vLLM never gives: wrong JSON
shapes, non-JSON, NaN and infinities, absurd nesting. Each must treat them as "unknown" —
never raise into the guard (a crash at start, or a background task dying quietly)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from vllm_guard.config import GuardSettings
from vllm_guard.engine.state import detect_scheduling_policy
from vllm_guard.proxy.usage import UsageTap, usage_of_body
from vllm_guard.upstream.connections import Upstream
from vllm_guard.upstream.monitor import EngineMonitor, parse_engine_metrics

DEEP = b"[" * 100_000 + b"]" * 100_000
ODD_JSON = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"text"',
    b"42",
    b"[{}]",
    b'{"vllm_config": "x"}',
    b'{"vllm_config": {"scheduler_config": []}}',
    b'{"vllm_config": {"scheduler_config": {"policy": {}}}}',
    b'{"data": 5}',
    b'{"data": [1, null, {"max_model_len": "7"}, {"max_model_len": 1e400}]}',
    b'{"count": "5"}',
    b'{"count": -3}',
    b'{"count": true}',
    b"\xff\xfe",
    DEEP,
]


@contextlib.asynccontextmanager
async def engine(body: bytes, content_type: str = "application/json") -> AsyncIterator[str]:
    """A stand-in engine answering 200 with `body` on every path."""

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("body", ODD_JSON)
def test_server_info_of_any_shape_is_unknown_not_a_crash(body):
    async def run():
        async with engine(body) as url:
            return await detect_scheduling_policy(url)

    assert asyncio.run(run()) is None


def test_server_info_policy_must_be_a_string():
    async def run():
        async with engine(b'{"vllm_config": {"scheduler_config": {"policy": "priority"}}}') as u:
            return await detect_scheduling_policy(u)

    assert asyncio.run(run()) == "priority"


@pytest.mark.parametrize("body", ODD_JSON)
def test_tokenize_answers_of_any_shape_are_unknown(body):
    async def run():
        async with engine(body) as url:
            upstream = Upstream(url, GuardSettings())
            try:
                return await upstream.tokenize({"model": "m", "prompt": "hi"})
            finally:
                await upstream.close()

    assert asyncio.run(run()) is None


@pytest.mark.parametrize("body", ODD_JSON)
def test_the_monitor_survives_any_models_and_metrics_answer(body):
    """/v1/models and /metrics both answer `body`: the monitor keeps polling, knows no
    max_model_len, and its samples hold no made-up numbers."""

    async def run():
        async with engine(body, "text/plain") as url:
            monitor = EngineMonitor(url, lambda _s: None, interval_s=0.01)
            task = asyncio.create_task(monitor.run())
            await asyncio.sleep(0.3)
            alive = not task.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return alive, monitor

    alive, monitor = asyncio.run(run())
    assert alive
    assert monitor.max_model_len is None


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf", "-3", "1e400", "0x10"])
def test_engine_metrics_that_are_not_finite_counts_are_unknown(value):
    text = "\n".join(
        [
            f'vllm:kv_cache_usage_perc{{engine="0"}} {value}',
            f'vllm:num_requests_running{{engine="0"}} {value}',
            f'vllm:num_requests_waiting{{engine="0"}} {value}',
            f'vllm:num_preemptions_total{{engine="0"}} {value}',
            f'vllm:cache_config_info{{num_gpu_blocks="{value}",block_size="16"}} 1',
        ]
    )
    sample = parse_engine_metrics(text, 0.0)
    assert sample.kv_usage is None
    assert (sample.running, sample.waiting, sample.preemptions) == (None, None, None)
    assert sample.kv_capacity_tokens is None


@pytest.mark.parametrize("body", [*ODD_JSON, b'{"usage": {"total_tokens": -5}}'])
def test_usage_of_an_odd_answer_is_unknown(body):
    assert usage_of_body(body) is None
    tap = UsageTap(keep_usage=False)
    out = tap.feed(b'data: {"usage": ' + body + b"}\n\n")
    assert tap.usage is None or not isinstance(tap.usage.get("total_tokens"), int)
    assert isinstance(out, bytes)
