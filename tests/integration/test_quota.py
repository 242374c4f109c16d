"""Tenant quotas on the real vLLM, seen through the official openai SDK.

`metered` may send one request per 2 s (30/min, burst 1); `metered-tokens` has 20,000
tokens a day (a refill of 0.23 tokens/s, so its bucket barely moves during a test).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration


async def test_over_the_limit_gets_429_and_the_sdk_retry_succeeds_after_the_advertised_delay(
    stack,
):
    async with stack.async_client("METERED_KEY") as once:
        await once.completions.create(model="tiny", prompt="a", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as hit:
            await once.completions.create(model="tiny", prompt="a", max_tokens=1)
    advertised_s = int(hit.value.response.headers["retry-after-ms"]) / 1000
    assert 1.0 < advertised_s <= 2.0
    assert hit.value.body["type"] == "rate_limit_exceeded"
    assert hit.value.body["code"] == "requests_per_minute"
    assert hit.value.response.headers["x-ratelimit-remaining-requests"] == "0"

    hits_before = await stack.aguard_metric("vllm_guard_rate_limited_total", 'tenant="metered"')
    async with stack.async_client("METERED_KEY", max_retries=3) as retrying:
        t0 = time.monotonic()
        raw = await retrying.completions.with_raw_response.create(
            model="tiny", prompt="a", max_tokens=1
        )
        elapsed = time.monotonic() - t0
    assert raw.http_response.status_code == 200
    # One 429, whose retry-after-ms the SDK slept, then success: the advertised delay was
    # neither too short (a second 429) nor much too long.
    hits = await stack.aguard_metric("vllm_guard_rate_limited_total", 'tenant="metered"')
    assert hits - hits_before == 1
    assert 1.0 < elapsed < 3.0


async def test_ratelimit_headers_on_streaming_and_plain_responses(stack):
    await asyncio.sleep(2.1)  # let `metered` refill its one request
    async with stack.async_client("METERED_KEY") as client:
        plain = await client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        await asyncio.sleep(2.1)
        streamed = await client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
        )
        async for _ in streamed.parse():
            pass
    for raw in (plain, streamed):
        assert raw.headers["x-ratelimit-limit-requests"] == "30"
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        assert raw.headers["x-ratelimit-reset-requests"] == "2s"


async def test_stream_is_settled_with_real_usage_and_the_unasked_usage_chunk_is_hidden(stack):
    cap = 20000
    before = _vllm_tokens(stack)
    async with stack.async_client("METERED_TOKENS_KEY") as client:
        raw = await client.completions.with_raw_response.create(
            model="tiny", prompt="tell me a long story", max_tokens=300, stream=True
        )
        charged_first = cap - int(raw.headers["x-ratelimit-remaining-tokens"])
        chunks = [c async for c in raw.parse()]
        assert chunks and all(c.usage is None for c in chunks)
        used = await _vllm_tokens_settled(stack, before)
        assert used <= charged_first  # the estimate (exact prompt + max_tokens) is an upper bound

        prompt = "x y z"
        second_estimate = _tokenize(stack, prompt) + 5
        raw2 = await client.completions.with_raw_response.create(
            model="tiny", prompt=prompt, max_tokens=5
        )
    # The first request was settled down to what vLLM really processed before the second
    # was charged (refill adds at most 1 token over the test).
    remaining = int(raw2.headers["x-ratelimit-remaining-tokens"])
    assert cap - used - second_estimate <= remaining <= cap - used - second_estimate + 1


async def test_usage_chunk_is_kept_when_the_client_asks_and_matches_the_estimate(stack):
    async with stack.async_client("METERED_TOKENS_KEY") as client:
        messages = [{"role": "user", "content": "count the tokens of this chat, please"}]
        expected_prompt = _tokenize_chat(stack, messages)
        stream = await client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == expected_prompt  # /tokenize is exact
    assert chunks[-1].usage.completion_tokens == 4


def _count(stack, body: dict) -> int:
    """vLLM's own count (straight to its port, with the guard's engine key)."""
    r = httpx.post(
        stack.vllm_url + "/tokenize", json=body, headers=stack.engine_headers, timeout=30
    )
    return int(r.json()["count"])


def _tokenize(stack, prompt: str) -> int:
    body = {"model": "tiny", "prompt": prompt}
    return _count(stack, body)


def _tokenize_chat(stack, messages: list[dict[str, str]]) -> int:
    body = {"model": "tiny", "messages": messages}
    return _count(stack, body)


def _vllm_tokens(stack) -> float:
    return stack.vllm_metric("vllm:prompt_tokens_total") + stack.vllm_metric(
        "vllm:generation_tokens_total"
    )


async def _vllm_tokens_settled(stack, before: float, timeout_s: float = 10) -> int:
    """Tokens vLLM processed since `before`, once its counters stop moving."""
    deadline = time.monotonic() + timeout_s
    last = -1.0
    while time.monotonic() < deadline:
        now = await asyncio.to_thread(_vllm_tokens, stack)
        if now == last and now > before:
            return int(now - before)
        last = now
        await asyncio.sleep(0.3)
    raise AssertionError("vLLM's token counters did not settle")
