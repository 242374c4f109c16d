"""The rate-limited client against httpx's mock transport: retries, delays, limits."""

from __future__ import annotations

import asyncio
import json
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


async def test_an_advertised_delay_is_capped_by_the_clients_maximum():
    sleeps: list[float] = []
    script = Script((429, {"retry-after-ms": "86400000"}))  # a day
    async with client_for(script, sleeps, max_retry_after_s=30) as c:
        resp = await c.post("/v1/completions", BODY)
    assert resp.ok and sleeps == [30]


async def test_a_retry_that_would_end_past_the_callers_deadline_is_not_waited_for():
    sleeps: list[float] = []
    script = Script((503, {"retry-after-ms": "5000"}))
    async with client_for(script, sleeps) as c:
        with pytest.raises(RetriesExhausted) as exc:
            await c.post("/v1/completions", BODY, deadline_s=2.0)
    assert sleeps == []  # it gives up at once instead of sleeping past the deadline
    assert exc.value.last.status == 503


@pytest.mark.parametrize(
    "kw",
    [
        {"max_attempts": 0},
        {"max_concurrency": 0},
        {"requests_per_minute": -1},
        {"tokens_per_minute": 0.0},
        {"initial_concurrency": 100, "max_concurrency": 4},
        {"backoff_base_s": -1},
        {"max_retry_after_s": 0},
        {"timeout_s": 0},
    ],
)
def test_the_constructor_refuses_nonsense_with_a_clear_error(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        LimitedClient("http://test", **kw)


async def test_callers_waiting_on_the_local_limit_go_in_order_with_one_sleeper():
    """Callers held by the requests/min bucket queue FIFO behind one sleeping head, instead
    of each running its own sleep loop (a thundering herd at every refill)."""
    sleeping = [0]
    most = [0]
    order: list[int] = []

    async def sleep(s: float) -> None:
        sleeping[0] += 1
        most[0] = max(most[0], sleeping[0])
        await asyncio.sleep(0.01)
        sleeping[0] -= 1

    def answer(request: httpx.Request) -> httpx.Response:
        order.append(json.loads(request.read())["n"])
        return httpx.Response(200, json=OK)

    c = LimitedClient(
        "http://test",
        transport=httpx.MockTransport(answer),
        sleep=sleep,
        requests_per_minute=6000,  # 100 per second
        max_concurrency=64,
        adaptive=False,
        learn_limits=False,
    )
    bucket, now = c._buckets["requests"], asyncio.get_running_loop().time()
    bucket.reserve(bucket.capacity, now)  # spend it all: each caller now waits 10 ms
    bucket.settle(bucket.capacity, bucket.capacity, now)
    async with c:
        await asyncio.gather(*(c.post("/v1/completions", {**BODY, "n": i}) for i in range(8)))
    assert order == list(range(8))
    assert most[0] == 1
