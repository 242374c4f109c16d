"""The rate-limited client against httpx's mock transport: retries, delays, limits."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from vllm_guard.client.limited import LimitedClient, RetriesExhausted

BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}
OK = {"choices": [{"text": "hi"}], "usage": {"total_tokens": 6}}


class Script:
    """Answers in turn from a list of (status, headers) or exceptions; then 200s."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            status, headers = answer
            return httpx.Response(status, headers=headers, json={"error": {"code": str(status)}})
        return httpx.Response(200, json=OK)


def client_for(script, sleeps, **kw) -> LimitedClient:
    async def sleep(s: float) -> None:
        sleeps.append(s)

    return LimitedClient(
        "http://test",
        "key",
        transport=httpx.MockTransport(script),
        sleep=sleep,
        rng=random.Random(1),
        **kw,
    )


async def test_429_is_retried_after_exactly_the_advertised_delay():
    sleeps: list[float] = []
    script = Script((429, {"retry-after-ms": "1234", "retry-after": "2"}))
    async with client_for(script, sleeps) as c:
        resp = await c.post("/v1/completions", BODY)
    assert resp.ok and resp.attempts == 2 and resp.body == OK
    assert sleeps == [1.234]  # retry-after-ms wins over the rounded retry-after
    assert (c.stats.rate_limited, c.stats.retries, c.stats.requests) == (1, 1, 2)
    assert c.stats.hit_rate == 0.5
    event = c.stats.retry_log[0]
    assert event.advertised_s == 1.234 and event.sent_at >= event.refused_at
    assert c.stats.tokens == 6


async def test_retry_after_seconds_when_no_ms_and_jittered_backoff_without_either():
    sleeps: list[float] = []
    script = Script((503, {"retry-after": "3"}), (502, {}), (504, {}))
    async with client_for(script, sleeps, backoff_base_s=1.0) as c:
        assert (await c.post("/v1/completions", BODY)).ok
    assert sleeps[0] == 3.0
    assert 0 <= sleeps[1] <= 2.0 and 0 <= sleeps[2] <= 4.0  # full jitter, doubling caps


async def test_client_errors_are_not_retried():
    sleeps: list[float] = []
    script = Script((400, {}))
    async with client_for(script, sleeps) as c:
        resp = await c.post("/v1/completions", BODY)
    assert resp.status == 400 and resp.body == {"error": {"code": "400"}}
    assert script.calls == 1 and sleeps == []


async def test_connection_errors_retry_and_exhaustion_carries_the_last_failure():
    sleeps: list[float] = []
    script = Script(*[httpx.ConnectError("refused")] * 2, *[(503, {})] * 5)
    async with client_for(script, sleeps, max_attempts=3) as c:
        with pytest.raises(RetriesExhausted) as info:
            await c.post("/v1/completions", BODY)
    assert info.value.attempts == 3 and len(sleeps) == 2
    last = info.value.last
    assert getattr(last, "status", None) == 503
    assert c.stats.in_flight == 0 and c.stats.waiting == 0


async def test_limits_learned_from_headers_pace_the_next_request():
    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0"}
        return httpx.Response(200, headers=headers, json=OK)

    loop = asyncio.get_running_loop()
    async with LimitedClient("http://test", transport=httpx.MockTransport(answer)) as c:
        await c.post("/v1/completions", BODY)
        assert c.limits == {"requests": 600}
        t0 = loop.time()
        await c.post("/v1/completions", BODY)  # the server said 0 remain: ~0.1 s to refill
        assert 0.08 < loop.time() - t0 < 0.5


async def test_concurrency_halves_on_overload_and_grows_back():
    sleeps: list[float] = []
    script = Script((429, {"retry-after-ms": "1"}))
    async with client_for(script, sleeps, initial_concurrency=8, max_concurrency=16) as c:
        await c.post("/v1/completions", BODY)
        assert c.concurrency_limit == 4
        for _ in range(40):
            await c.post("/v1/completions", BODY)
        assert c.concurrency_limit > 4


async def test_each_retry_is_logged_against_its_own_call():
    """With calls interleaving, every retry's send time belongs to its own refusal."""
    script = Script(
        (429, {"retry-after-ms": "80"}),
        (429, {"retry-after-ms": "20"}),
        (429, {"retry-after-ms": "50"}),
    )
    transport = httpx.MockTransport(script)
    async with LimitedClient("http://t", transport=transport, initial_concurrency=8) as c:
        await asyncio.gather(*(c.post("/v1/completions", BODY) for _ in range(3)))
    events = list(c.stats.retry_log)
    assert sorted(e.advertised_s for e in events) == [0.02, 0.05, 0.08]
    for e in events:
        assert e.sent_at - e.refused_at >= e.advertised_s - 0.001
