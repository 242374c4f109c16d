"""Tenant quotas in the ASGI app against the fake upstream: 429s, headers, usage, settling."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio

from tests.conftest import KEYS
from tests.unit.asgi import Client, call
from tests.unit.conftest import ManualClock, ready_app, until
from vllm_guard.config import parse_config
from vllm_guard.core.quota import REQUESTS, TOKENS_DAY
from vllm_guard.proxy.app import GuardApp
from vllm_guard.proxy.usage import UsageTap

CONFIG = """
engine: {max_num_seqs: 4}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 1, max_queue: 3, max_wait_s: 5}
  batch: {vllm_priority: 10, max_queue: 5, max_wait_s: 60, default_max_tokens: 50, on_limit: reject}
  bulk: {vllm_priority: 20, max_wait_s: 2}  # on_limit: wait, the default below the top class
tenants:
  chat-ui:
    class: interactive
    api_keys: ["env:CHAT_UI_KEY"]
    limits: {requests_per_minute: 2}
  nightly-etl:
    class: batch
    api_keys: ["env:ETL_KEY"]
    limits: {tokens_per_day: 600, max_concurrent: 2}  # day: no refill to speak of in a test
  backfill:
    class: bulk
    api_keys: ["env:BACKFILL_KEY"]
    limits: {requests_per_minute: 60, burst: {requests_per_minute: 2}, max_concurrent: 1}
"""
BACKFILL = {"Authorization": "Bearer backfill-secret"}
CHAT = {"Authorization": "Bearer chat-secret"}
ETL = {"Authorization": "Bearer etl-secret"}


@pytest_asyncio.fixture
async def app(fake):
    app = ready_app(
        parse_config(CONFIG, "test.yaml", {**KEYS, "BACKFILL_KEY": "backfill-secret"}), fake
    )
    yield app
    await app.upstream.close()


@pytest_asyncio.fixture
async def clocked(fake):
    """The app on a manual clock: waits for refills and deadlines take no real time."""
    clock = ManualClock()
    app = ready_app(
        parse_config(CONFIG, "test.yaml", {**KEYS, "BACKFILL_KEY": "backfill-secret"}),
        fake,
        clock,
    )
    yield app, clock
    await app.upstream.close()


def level(app: GuardApp, tenant: str, dim: str) -> float:
    bucket = app.quota_gates[tenant].quota.buckets[dim]
    bucket.refill(asyncio.get_running_loop().time())
    return bucket.level


async def test_over_rpm_gets_429_with_exact_retry_after_and_headers(app, fake):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    first = await call(app, "POST", "/v1/completions", CHAT, body)
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "30s"  # one request at 2/min
    assert 0 <= float(first.headers["x-vllm-guard-quota-ms"]) < 1000
    assert (await call(app, "POST", "/v1/completions", CHAT, body)).status == 200
    refused = await call(app, "POST", "/v1/completions", CHAT, body)
    assert refused.status == 429
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_exceeded"
    assert error["code"] == REQUESTS
    assert "requests_per_minute (limit 2)" in error["message"]
    # Both requests were charged about now: the first slot comes back in ~30 s.
    assert 29_000 < int(refused.headers["retry-after-ms"]) <= 30_000
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(fake.requests) == 2  # the refused one never reached vLLM
    assert fake.tokenize_calls == 0  # a requests-only limit needs no token count


async def test_stream_usage_is_requested_settled_and_hidden_from_the_client(app, fake):
    body = {"model": "tiny", "prompt": "x" * 20, "max_tokens": 100, "stream": True}
    r = await call(app, "POST", "/v1/completions", ETL, body)
    assert r.status == 200
    forwarded = fake.requests[-1][1]
    assert forwarded["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in r.body  # the client did not ask for it
    assert r.body.endswith(b"data: [DONE]\n\n")
    assert r.headers["x-ratelimit-limit-tokens"] == "600"
    assert r.headers["x-ratelimit-remaining-tokens"] == str(600 - 120)  # charged 20 + 100
    # Settled with the real usage: 20 prompt + 5 completion tokens.
    assert level(app, "nightly-etl", TOKENS_DAY) == pytest.approx(600 - 25, abs=0.1)


async def test_stream_usage_chunk_kept_when_the_client_asked(app, fake):
    body = {
        "model": "tiny",
        "prompt": "abc",
        "max_tokens": 10,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await call(app, "POST", "/v1/completions", ETL, body)
    events = [e for e in r.body.split(b"\n\n") if e.startswith(b"data: {")]
    assert json.loads(events[-1][6:])["usage"]["total_tokens"] == 8


async def test_default_max_tokens_is_charged_when_the_request_sets_none(app, fake):
    r = await call(app, "POST", "/v1/completions", ETL, {"model": "tiny", "prompt": "abcd"})
    assert r.status == 200
    assert r.headers["x-ratelimit-remaining-tokens"] == str(600 - 54)  # 4 + class default 50
    assert "max_tokens" not in fake.requests[-1][1]  # the request itself is not changed


async def test_a_request_that_can_never_fit_gets_400_at_once(app, fake):
    r = await call(app, "POST", "/v1/completions", ETL, {"prompt": "a", "max_tokens": 700})
    assert r.status == 400
    assert r.json()["error"]["code"] == "request_exceeds_limit"
    assert "at least 700 tokens" in r.json()["error"]["message"]
    assert fake.requests == [] and fake.tokenize_calls == 0  # refused before any engine call
    assert level(app, "nightly-etl", TOKENS_DAY) == pytest.approx(600)
    # One that fits on its completion alone is counted exactly, then refused on the total.
    r = await call(app, "POST", "/v1/completions", ETL, {"prompt": "abc", "max_tokens": 598})
    assert r.status == 400 and "estimated 601 tokens" in r.json()["error"]["message"]
    assert fake.tokenize_calls == 1 and fake.requests == []


TOKENIZED = """
classes:
  interactive: {vllm_priority: 0, max_wait_s: 5}
  bulk: {vllm_priority: 20, max_wait_s: 5}
tenants:
  chat-ui:
    class: interactive
    api_keys: ["env:CHAT_UI_KEY"]
    limits: {requests_per_minute: 1, tokens_per_minute: 100000}
  nightly-etl:
    class: bulk
    api_keys: ["env:ETL_KEY"]
    limits: {requests_per_minute: 1, tokens_per_minute: 100000}
"""


@pytest.mark.parametrize("headers", [CHAT, ETL], ids=["reject", "wait"])
async def test_requests_over_the_limit_cost_the_engine_nothing(fake, headers):
    """1 request/min and a token limit (so prompts are counted with vLLM's /tokenize):
    of 20 requests one is served; the other 19 are refused without any engine call,
    in the class that rejects and in the one that waits (the wait, 60 s, is past max_wait)."""
    app = ready_app(parse_config(TOKENIZED, "test.yaml", KEYS), fake)
    try:
        body = {"prompt": "hello", "max_tokens": 3}
        replies = await asyncio.gather(
            *(call(app, "POST", "/v1/completions", headers, body) for _ in range(20))
        )
        assert sorted(r.status for r in replies) == [200] + [429] * 19
        assert fake.tokenize_calls == 1 and len(fake.requests) == 1
    finally:
        await app.upstream.close()


async def test_tokenize_calls_are_bounded(fake):
    """More requests at once than max_concurrent_tokenize: the rest are counted by the
    heuristic, and vLLM never sees more than the bound of /tokenize calls at a time."""
    config = TOKENIZED.replace("requests_per_minute: 1,", "").replace(
        "classes:", "guard: {max_concurrent_tokenize: 2}\nclasses:"
    )
    app = ready_app(parse_config(config, "test.yaml", KEYS), fake)
    try:
        fake.tokenize_delay_s = 0.2
        body = {"prompt": "hello", "max_tokens": 3}
        replies = await asyncio.gather(
            *(call(app, "POST", "/v1/completions", CHAT, body) for _ in range(10))
        )
        assert [r.status for r in replies] == [200] * 10
        assert fake.tokenize_calls == 2 and fake.tokenize_peak == 2
    finally:
        await app.upstream.close()


async def test_concurrency_limit_and_release_on_disconnect(app, fake):
    fake.mode = "hang"
    clients = [Client(json.dumps({"prompt": "ab", "max_tokens": 5}).encode()) for _ in range(2)]
    tasks = [
        asyncio.create_task(call(app, "POST", "/v1/completions", ETL, client=c)) for c in clients
    ]
    await until(lambda: fake.active == 2)
    third = await call(app, "POST", "/v1/completions", ETL, {"prompt": "ab", "max_tokens": 5})
    assert third.status == 429
    assert third.json()["error"]["code"] == "max_concurrent"
    assert third.headers["retry-after"] == "1"
    for c in clients:
        c.disconnect()
    await asyncio.gather(*tasks)
    assert app.quota_gates["nightly-etl"].quota.in_flight == 0
    await until(lambda: fake.active == 0)
    assert fake.aborted == 2  # the guard hung up on vLLM too, before any response began
    # vLLM was working on both when their clients left: each pays its estimate (2 + 5).
    assert level(app, "nightly-etl", TOKENS_DAY) == pytest.approx(600 - 14, abs=0.1)


async def test_refused_by_the_engine_being_down_costs_nothing(app, fake):
    app.engine.set("restarting")
    r = await call(app, "POST", "/v1/completions", CHAT, {"prompt": "a", "max_tokens": 1})
    assert r.status == 503
    assert level(app, "chat-ui", REQUESTS) == pytest.approx(2)


async def test_upstream_unreachable_refunds_everything(app, fake):
    await fake.stop()
    r = await call(app, "POST", "/v1/completions", ETL, {"prompt": "abc", "max_tokens": 7})
    assert r.status == 503
    assert app.quota_gates["nightly-etl"].quota.in_flight == 0
    assert level(app, "nightly-etl", TOKENS_DAY) == pytest.approx(600)


def test_usage_tap_handles_events_split_anywhere():
    usage = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    stream = (
        b'data: {"choices":[{"text":"a"}]}\n\n'
        b'data: {"choices":[{"text":"b"}],"usage":null}\n\n'
        b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
        b"data: [DONE]\n\n"
    )
    for cut in range(1, len(stream)):
        tap = UsageTap(keep_usage=False)
        out = tap.feed(stream[:cut]) + tap.feed(stream[cut:]) + tap.flush()
        assert out == stream.replace(
            b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n", b""
        )
        assert tap.usage == usage
        assert tap.events == 2


async def test_stream_cut_by_the_client_pays_prompt_plus_tokens_streamed(app, fake):
    fake.mode = "slow"
    client = Client(json.dumps({"prompt": "abcd", "max_tokens": 100, "stream": True}).encode())
    task = asyncio.create_task(call(app, "POST", "/v1/completions", ETL, client=client))
    await client.first_body.wait()
    await asyncio.sleep(0.06)  # about two events in
    client.disconnect()
    await task
    streamed = client.reply.body.count(b"data: {")
    assert 1 <= streamed < 5
    assert app.quota_gates["nightly-etl"].quota.in_flight == 0
    assert level(app, "nightly-etl", TOKENS_DAY) == pytest.approx(600 - 4 - streamed, abs=0.1)


# -- on_limit: wait ----------------------------------------------------------------------


async def test_wait_class_holds_the_request_until_the_bucket_refills(clocked, fake):
    app, clock = clocked
    body = {"prompt": "a", "max_tokens": 1}
    for _ in range(2):  # the burst
        assert (await call(app, "POST", "/v1/completions", BACKFILL, body)).status == 200
    second = asyncio.create_task(call(app, "POST", "/v1/completions", BACKFILL, body))
    await until(lambda: app.quota_gates["backfill"].waiting == 1)
    await clock.advance(0.99)  # one request per second: not yet
    assert not second.done() and len(fake.requests) == 2
    await clock.advance(0.02)  # the refill time, no polling: the one timer fires
    reply = await asyncio.wait_for(second, 5)
    assert reply.status == 200 and len(fake.requests) == 3
    assert 990 < float(reply.headers["x-vllm-guard-quota-ms"]) < 1010


async def test_wait_class_is_woken_by_a_settle_for_concurrency(app, fake):
    fake.mode = "hang"
    body = {"prompt": "a", "max_tokens": 1}
    first = asyncio.create_task(call(app, "POST", "/v1/completions", BACKFILL, body))
    await until(lambda: fake.active == 1)
    # The requests bucket has a second request's room (burst 2); only concurrency blocks.
    second = asyncio.create_task(call(app, "POST", "/v1/completions", BACKFILL, body))
    await until(lambda: app.quota_gates["backfill"].waiting == 1)
    fake.mode = "ok"
    fake.release.set()  # the first ends, settles, and wakes the second
    assert (await first).status == 200
    assert (await second).status == 200
    assert app.quota_gates["backfill"].quota.in_flight == 0


async def test_wait_gives_429_at_max_wait_and_refuses_at_once_when_waiting_cannot_help(
    clocked, fake
):
    app, clock = clocked
    fake.mode = "hang"
    body = {"prompt": "a", "max_tokens": 1}
    first = asyncio.create_task(call(app, "POST", "/v1/completions", BACKFILL, body))
    await until(lambda: fake.active == 1)
    second = asyncio.create_task(call(app, "POST", "/v1/completions", BACKFILL, body))
    await until(lambda: app.quota_gates["backfill"].waiting == 1)
    await clock.advance(1.99)
    assert not second.done()
    await clock.advance(0.02)  # concurrency never freed within bulk's max_wait_s of 2 s
    reply = await asyncio.wait_for(second, 5)
    assert reply.status == 429
    assert reply.json()["error"]["code"] == "max_concurrent"
    fake.release.set()
    await first


async def test_disconnect_while_waiting_on_quota_leaves_nothing(app, fake):
    fake.mode = "hang"
    body = json.dumps({"prompt": "a", "max_tokens": 1}).encode()
    first = asyncio.create_task(call(app, "POST", "/v1/completions", BACKFILL, body))
    await until(lambda: fake.active == 1)
    client = Client(body)
    waiting = asyncio.create_task(call(app, "POST", "/v1/completions", BACKFILL, client=client))
    await until(lambda: app.quota_gates["backfill"].waiting == 1)
    client.disconnect()
    await waiting
    assert app.quota_gates["backfill"].waiting == 0
    assert app.quota_gates["backfill"].quota.in_flight == 1  # only the first
    fake.release.set()
    await first
    assert app.quota_gates["backfill"].quota.in_flight == 0


async def test_latency_ttft_and_token_metrics(app, fake):
    body = {"model": "tiny", "prompt": "x" * 20, "max_tokens": 100, "stream": True}
    assert (await call(app, "POST", "/v1/completions", ETL, body)).status == 200
    text = (await call(app, "GET", "/metrics")).body.decode()
    assert 'vllm_guard_time_to_first_token_seconds_count{class="batch"} 1.0' in text
    assert 'vllm_guard_request_duration_seconds_count{class="batch"} 1.0' in text
    assert 'vllm_guard_tenant_tokens_total{kind="charged",tenant="nightly-etl"} 120.0' in text
    assert 'vllm_guard_tenant_tokens_total{kind="used",tenant="nightly-etl"} 25.0' in text
    # A refused request is not "served": no latency sample for it.
    too_big = {"prompt": "a", "max_tokens": 700}
    assert (await call(app, "POST", "/v1/completions", ETL, too_big)).status == 400
    text = (await call(app, "GET", "/metrics")).body.decode()
    assert 'vllm_guard_request_duration_seconds_count{class="batch"} 1.0' in text
