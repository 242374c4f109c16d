"""Two real engines behind one `vllm-guard proxy`: the session's vLLM and a second one.
Requests spread over both; one engine stopped (SIGSTOP) is taken out of rotation, the
requests it held without answering go to the other (none lost), and it comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from tests.integration.conftest import CONFIG, KEYS
from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.testing.stack import Stack, start_proxy, stop, wait_healthy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_engines(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("engines")
    second = Stack(
        log_dir=work / "second",
        config_path=CONFIG,
        keys=KEYS,
        engine_key=stack.engine_key,  # one guard key for both engines
        vllm_args=("--enforce-eager",),
        env={"VLLM_CPU_OMP_THREADS_BIND": "1"},  # the session's engine computes on core 0
    )
    second.start()
    config = work / "limits.yaml"
    config.write_text(
        CONFIG.read_text()
        .replace("guard: {", 'guard: {engine_key: "env:VLLM_GUARD_ENGINE_KEY", ', 1)
        .replace("scheduler: vllm}", "scheduler: vllm, hang_detect_s: 3}", 1)
    )
    port, log = free_port(), work / "proxy.log"
    proc = None
    try:
        second.wait_ready_blocking()
        env = {**KEYS, "VLLM_GUARD_ENGINE_KEY": stack.engine_key}
        extra = ("--upstream", second.vllm_url)
        proc = start_proxy(stack.vllm_url, config, port, env, log, extra_args=extra)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, 60, log)
        yield url, stack, second, log
    finally:
        if proc is not None:
            stop(proc)
        second.stop()


def _metrics(url: str) -> dict[str, float]:
    return parse_prometheus(httpx.get(url + "/metrics", timeout=10).text)


def _label(stack: Stack) -> str:
    return "engine=" + stack.vllm_url.removeprefix("http://")


async def test_requests_spread_over_both_engines(two_engines):
    url, first, second, _ = two_engines
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEYS["ETL_KEY"], max_retries=0)
    async with client:
        await _spread(url, first, second, client)


async def _spread(url: str, first: Stack, second: Stack, client: openai.AsyncOpenAI) -> None:
    seen: dict[str, float] = {}

    async def one() -> int:
        r = await client.completions.create(
            model="tiny", prompt="spread", max_tokens=200, extra_body={"ignore_eos": True}
        )
        return r.usage.completion_tokens

    tasks = [asyncio.create_task(one()) for _ in range(6)]  # 3 batch slots per engine
    deadline = time.monotonic() + 60
    while not all(seen.get(s, 0) for s in (_label(first), _label(second))):
        assert time.monotonic() < deadline, f"not spread: {seen}"
        m = await asyncio.to_thread(_metrics, url)
        for s in (_label(first), _label(second)):
            seen[s] = max(seen.get(s, 0), total(m, "vllm_guard_engine_in_flight", s))
        await asyncio.sleep(0.1)
    assert await asyncio.gather(*tasks) == [200] * 6
    m = await asyncio.to_thread(_metrics, url)
    assert total(m, "vllm_guard_engine_in_flight") == 0


async def test_a_stopped_engine_leaves_the_rotation_loses_nothing_and_comes_back(two_engines):
    url, _, second, log = two_engines
    client = openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=KEYS["CHAT_UI_KEY"], max_retries=0, timeout=60
    )
    async with client:
        await _stop_and_continue(url, second, log, client)


async def _stop_and_continue(url: str, second: Stack, log, client: openai.AsyncOpenAI) -> None:
    api_server, _ = second.vllm_pids()
    results: list[int | str] = []
    stop_at = time.monotonic() + 14

    async def steady() -> None:  # non-streaming: nothing is answered before the end
        while time.monotonic() < stop_at:
            try:
                r = await client.completions.create(
                    model="tiny", prompt="x", max_tokens=8, extra_body={"ignore_eos": True}
                )
                results.append(r.usage.completion_tokens)
            except openai.APIError as exc:
                results.append(repr(exc))

    clients = [asyncio.create_task(steady()) for _ in range(3)]
    await asyncio.sleep(2)
    os.kill(api_server, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while total(await asyncio.to_thread(_metrics, url), "vllm_guard_engine_up", _label(second)):
            assert time.monotonic() - stopped < 10, "the stopped engine stayed in rotation"
            await asyncio.sleep(0.1)
        out_after_s = time.monotonic() - stopped
        await asyncio.gather(*clients)
    finally:
        os.kill(api_server, signal.SIGCONT)
    assert out_after_s < 6  # hang_detect_s 3, checked once a second
    assert all(r == 8 for r in results), [r for r in results if r != 8]  # none lost
    assert len(results) > 10
    m = await asyncio.to_thread(_metrics, url)
    assert total(m, "vllm_guard_engine_failovers_total", _label(second)) >= 1
    back = time.monotonic()
    while not total(await asyncio.to_thread(_metrics, url), "vllm_guard_engine_up", _label(second)):
        assert time.monotonic() - back < 15, "the resumed engine did not come back"
        await asyncio.sleep(0.2)
    # Back through its health poll (out as unreachable) or through the watchdog (out as hung).
    name = "engine 1 (" + _label(second).removeprefix("engine=") + ")"
    text = log.read_text()
    assert f"{name} unreachable -> ready" in text or f"{name} works again" in text
