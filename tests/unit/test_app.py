"""The ASGI guard against a fake upstream: protocol details and release on every path."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from tests.conftest import BASE_CONFIG, KEYS
from tests.unit.asgi import Client, call
from tests.unit.conftest import ready_app, until
from tests.unit.fake_upstream import FakeVllm
from vllm_guard.config import parse_config
from vllm_guard.engine.state import EngineState
from vllm_guard.proxy.app import GuardApp
from vllm_guard.upstream.connections import Upstream

CHAT = {"Authorization": "Bearer chat-secret"}
ETL = {"Authorization": "Bearer etl-secret"}
BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


@pytest_asyncio.fixture
async def app(fake):
    app = ready_app(parse_config(BASE_CONFIG, "test.yaml", KEYS), fake)
    yield app
    await app.upstream.close()


def in_flight(app: GuardApp) -> int:
    return app.admission.in_flight


def queued(app: GuardApp) -> int:
    return sum(s.queued for s in app.admission.statistics())


async def test_priority_is_set_from_class_and_clamped(app, fake):
    r = await call(app, "POST", "/v1/completions", CHAT, {**BODY, "priority": -100})
    assert r.status == 200
    assert fake.requests[-1][1]["priority"] == 0  # raised to the class's own priority
    await call(app, "POST", "/v1/completions", CHAT, {**BODY, "priority": 7})
    assert fake.requests[-1][1]["priority"] == 7  # lowering one's own urgency is allowed
    await call(app, "POST", "/v1/completions", ETL, BODY)
    assert fake.requests[-1][1]["priority"] == 10


async def test_unusual_unicode_is_forwarded_intact(app, fake):
    raw = b'{"prompt": "caf\\u00e9 \\ud800 \xe2\x9c\x93", "max_tokens": 2}'
    r = await call(app, "POST", "/v1/completions", CHAT, raw)
    assert r.status == 200
    assert fake.requests[-1][1]["prompt"] == "caf\u00e9 \ud800 \u2713"


async def test_client_priority_header_and_key_never_reach_vllm(app, fake):
    headers = {**CHAT, "X-Vllm-Priority": "-50", "X-data-parallel-rank": "3", "X-Request-Id": "r1"}
    r = await call(app, "POST", "/v1/completions", headers, BODY)
    assert r.status == 200
    sent = {k.lower(): v for k, v in fake.requests[-1][0].items()}
    assert "x-vllm-priority" not in sent
    assert "x-data-parallel-rank" not in sent
    assert "authorization" not in sent
    assert sent["x-request-id"] == "r1"


async def test_guard_headers_on_success_and_downgrade(app, fake):
    r = await call(app, "POST", "/v1/completions", {**CHAT, "x-vllm-guard-class": "batch"}, BODY)
    assert r.status == 200
    assert r.headers["x-vllm-guard-class"] == "batch"
    assert float(r.headers["x-vllm-guard-queue-ms"]) >= 0
    assert fake.requests[-1][1]["priority"] == 10


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, BODY, 401, "invalid_api_key"),
        ({"Authorization": "Bearer nope"}, BODY, 401, "invalid_api_key"),
        ({"Authorization": "Basic Y2hhdC1zZWNyZXQ="}, BODY, 401, "invalid_api_key"),
        ({**ETL, "x-vllm-guard-class": "interactive"}, BODY, 403, "class_not_allowed"),
        ({**CHAT, "x-vllm-guard-class": "vip"}, BODY, 400, "invalid_request"),
        (CHAT, b"{not json", 400, "invalid_request"),
        (CHAT, b"[1, 2]", 400, "invalid_request"),
        (CHAT, b"\xff\xfe", 400, "invalid_request"),
        (CHAT, {**BODY, "stream": "yes"}, 400, "invalid_request"),
        (CHAT, {**BODY, "priority": "high"}, 400, "invalid_request"),
        (CHAT, {**BODY, "priority": True}, 400, "invalid_request"),
    ],
)
async def test_bad_requests_get_openai_errors_and_hold_nothing(
    app, fake, headers, body, status, code
):
    r = await call(app, "POST", "/v1/chat/completions", headers, body)
    assert r.status == status
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert fake.requests == []
    assert in_flight(app) == 0 and queued(app) == 0


async def test_body_limit_by_header_and_by_bytes(app, fake):
    limit = app.config.guard.max_body_bytes
    big = b'{"prompt": "' + b"a" * limit + b'"}'
    r = await call(app, "POST", "/v1/completions", {**CHAT, "content-length": str(len(big))}, big)
    assert r.status == 413 and r.json()["error"]["code"] == "request_too_large"
    # Without a content-length (chunked upload) the limit is enforced while reading.
    r = await call(app, "POST", "/v1/completions", CHAT, client=Client(big, chunk_size=65536))
    assert r.status == 413
    assert fake.requests == []


async def test_paths_not_guarded_are_not_exposed(app):
    for path in ("/tokenize", "/v1/embeddings", "/reset_prefix_cache", "/server_info"):
        r = await call(app, "POST", path, CHAT, BODY)
        assert r.status == 404, path
    assert (await call(app, "GET", "/v1/completions", CHAT)).status == 405


async def test_models_needs_auth_then_passes(app):
    assert (await call(app, "GET", "/v1/models")).status == 401
    r = await call(app, "GET", "/v1/models", CHAT)
    assert r.status == 200 and r.json()["data"][0]["id"] == "tiny"


async def test_engine_down_gives_503_with_retry_after(app, fake):
    app.engine.set("restarting")
    r = await call(app, "POST", "/v1/completions", CHAT, BODY)
    assert r.status == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "engine_unavailable"
    health = await call(app, "GET", "/health")
    assert health.status == 503 and health.json()["status"] == "restarting"
    assert fake.requests == []


async def test_unreachable_upstream_releases_slot(app):
    engine = EngineState()
    engine.set("ready")
    # The discard port: connection refused.
    down = GuardApp(app.config, Upstream("http://127.0.0.1:9", app.config.guard), engine)
    r = await call(down, "POST", "/v1/completions", CHAT, BODY)
    assert r.status == 503 and "retry-after" in r.headers
    assert in_flight(down) == 0
    await down.upstream.close()


async def test_stream_passes_chunks_and_releases(app, fake):
    r = await call(app, "POST", "/v1/completions", CHAT, {**BODY, "stream": True})
    assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
    assert r.body.count(b"data: ") == 6 and r.body.endswith(b"data: [DONE]\n\n")
    assert in_flight(app) == 0


async def test_upstream_dying_mid_stream_ends_stream_with_error_event(app, fake):
    fake.mode = "die_mid_stream"
    r = await call(app, "POST", "/v1/completions", CHAT, {**BODY, "stream": True})
    assert r.status == 200 and r.complete
    assert b'"code":"upstream_error"' in r.chunks[-1]
    assert in_flight(app) == 0
    assert app.metrics.outcome["interactive", "upstream_error"]._value.get() == 1


async def test_disconnect_while_streaming_aborts_upstream(app, fake):
    fake.mode = "slow"
    client = Client(b'{"prompt": "x", "stream": true}')
    task = asyncio.create_task(call(app, "POST", "/v1/completions", CHAT, client=client))
    await asyncio.wait_for(client.first_body.wait(), 5)
    client.disconnect()
    await asyncio.wait_for(task, 5)  # the app returns normally, no exception escapes
    assert in_flight(app) == 0
    await until(lambda: fake.active == 0)
    assert fake.aborted == 1
    assert app.metrics.outcome["interactive", "client_disconnect"]._value.get() == 1


async def test_disconnect_while_queued_leaves_queue(app, fake):
    fake.mode = "hang"
    holders = [
        asyncio.create_task(call(app, "POST", "/v1/completions", ETL, BODY)) for _ in range(3)
    ]
    await until(lambda: fake.active == 3)
    client = Client(b'{"prompt": "x"}')
    waiter = asyncio.create_task(call(app, "POST", "/v1/completions", ETL, client=client))
    await until(lambda: queued(app) == 1)
    client.disconnect()
    await asyncio.wait_for(waiter, 5)
    assert queued(app) == 0 and in_flight(app) == 3
    fake.release.set()
    await asyncio.gather(*holders)
    assert in_flight(app) == 0 and len(fake.requests) == 3


async def test_queue_full_503_with_retry_after(app, fake):
    fake.mode = "hang"
    holders = [
        asyncio.create_task(call(app, "POST", "/v1/completions", ETL, BODY)) for _ in range(3)
    ]
    await until(lambda: fake.active == 3)
    waiters = [
        asyncio.create_task(call(app, "POST", "/v1/completions", ETL, BODY)) for _ in range(5)
    ]
    await until(lambda: queued(app) == 5)
    r = await call(app, "POST", "/v1/completions", ETL, BODY)
    assert r.status == 503 and r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) >= 1
    # The reserved slot still serves interactive at once, queue or not.
    fake.mode = "ok"
    r = await call(app, "POST", "/v1/completions", CHAT, BODY)
    assert r.status == 200
    fake.release.set()
    await asyncio.gather(*holders, *waiters)
    assert in_flight(app) == 0 and queued(app) == 0


async def test_metrics_show_queue_and_in_flight(app, fake):
    fake.mode = "hang"
    holder = asyncio.create_task(call(app, "POST", "/v1/completions", ETL, BODY))
    await until(lambda: fake.active == 1)
    text = (await call(app, "GET", "/metrics")).body.decode()
    assert 'vllm_guard_in_flight{class="batch"} 1.0' in text
    assert 'vllm_guard_queue_depth{class="interactive"} 0.0' in text
    assert 'vllm_guard_slot_limit{class="batch"} 3.0' in text
    assert "secret" not in text
    fake.release.set()
    await holder


class _StalledReader(Client):
    """A streaming client that takes the response head, then reads nothing: the guard's
    first body `send` waits (as on a full socket) until the client goes away."""

    async def send(self, message):
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()
        await super().send(message)


# The stand-in streams 16 KiB pieces. 100 kB: the guard holds the rest when A leaves;
# 18 pieces: the rest crosses the upstream high-water mark (256 KiB) with its last piece,
# so the connection is also paused (reused, B's request would hang).
@pytest.mark.parametrize("size", [100_000, 18 * 16384])
def test_a_stream_left_unread_never_reaches_the_next_tenant(run, size):
    """Tenant A streams a large answer, reads none of it and leaves after vLLM finished;
    tenant B's request must get B's own answer, never A's leftover events, and not hang."""

    async def main():
        fake = FakeVllm()
        await fake.start()
        app = ready_app(parse_config(BASE_CONFIG, "test.yaml", KEYS), fake)
        try:
            fake.mode, fake.big_body_bytes = "big", size
            stalled = _StalledReader(b'{"prompt": "a", "stream": true}')
            headers = {**CHAT, "X-Request-Id": "tenant-a"}
            path = "/v1/completions"
            task = asyncio.create_task(call(app, "POST", path, headers, client=stalled))
            await until(lambda: stalled.reply.status == 200 and fake.active == 0)
            await asyncio.sleep(0.2)  # the rest of A's answer reaches the guard
            stalled.disconnect()
            await asyncio.wait_for(task, 5)
            assert in_flight(app) == 0
            fake.mode = "ok"
            body = {**BODY, "stream": True}
            headers = {**ETL, "X-Request-Id": "tenant-b"}
            r = await asyncio.wait_for(call(app, "POST", "/v1/completions", headers, body), 5)
            assert r.status == 200
            assert b"tenant" not in r.body
            assert r.body.startswith(b'data: {"i": 0}') and r.body.count(b"[DONE]") == 1
            assert in_flight(app) == 0
        finally:
            await app.upstream.close()
            await fake.stop()

    run(main())


async def test_bodies_of_waiting_requests_are_bounded(fake):
    """guard.max_waiting_body_bytes: 64 KiB. With the batch slots held, queued requests of
    ~20 kB fill it after three; the fourth gets 503 (its queue had room), and once the
    queue drains the budget is whole again."""
    config = BASE_CONFIG.replace("engine:", "guard: {max_waiting_body_bytes: 65536}\nengine:")
    app = ready_app(parse_config(config, "test.yaml", KEYS), fake)
    try:
        fake.mode = "hang"
        small = {"prompt": "x", "max_tokens": 1}
        holders = [
            asyncio.create_task(call(app, "POST", "/v1/completions", ETL, small)) for _ in range(3)
        ]
        await until(lambda: fake.active == 3)
        big = {"prompt": "y" * 20_000, "max_tokens": 1}
        waiters = [
            asyncio.create_task(call(app, "POST", "/v1/completions", ETL, big)) for _ in range(3)
        ]
        await until(lambda: queued(app) == 3)
        r = await call(app, "POST", "/v1/completions", ETL, big)
        assert r.status == 503 and r.json()["error"]["code"] == "waiting_memory_full"
        assert int(r.headers["retry-after"]) >= 1
        fake.release.set()
        assert [r.status for r in await asyncio.gather(*holders, *waiters)] == [200] * 6
        assert app.generation.waiting_bytes == 0 and in_flight(app) == 0
        r = await call(app, "POST", "/v1/completions", ETL, big)
        assert r.status == 200
    finally:
        await app.upstream.close()


# -- each tenant its own prefix cache (cache_salt) -------------------------------------

SHARED = BASE_CONFIG.replace(
    '  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"]}',
    '  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"]}\n'
    '  shared: {class: batch, api_keys: ["env:SHARED_KEY"], share_prefix_cache: true}',
)


async def _salts(fake, config_text: str, calls) -> list:
    keys = {**KEYS, "SHARED_KEY": "shared-secret"}
    app = ready_app(parse_config(config_text, "test.yaml", keys), fake)
    try:
        out = []
        for headers, body in calls:
            r = await call(app, "POST", "/v1/completions", headers, {**BODY, **body})
            assert r.status == 200, r.body
            out.append(fake.requests[-1][1].get("cache_salt"))
        return out
    finally:
        await app.upstream.close()


async def test_each_tenant_gets_its_own_cache_salt_and_cannot_pick_another_one(fake):
    a, a_again, b, a_salted, b_salted = await _salts(
        fake,
        BASE_CONFIG,
        [
            (CHAT, {}),
            (CHAT, {}),
            (ETL, {}),
            (CHAT, {"cache_salt": "x"}),
            (ETL, {"cache_salt": "x"}),
        ],
    )
    assert a and b and a == a_again and a != b  # stable per tenant, different between them
    assert a_salted not in (a, b, "x") and b_salted not in (a, b, a_salted)
    for salt in (a, b, a_salted):  # what vLLM accepts
        assert len(salt) <= 128 and not set(salt) & set("/@\\\0")
    # A client that sends tenant B's salt as its own still gets a salt of its own.
    (stolen,) = await _salts(fake, BASE_CONFIG, [(CHAT, {"cache_salt": b})])
    assert stolen != b


async def test_a_tenant_that_shares_the_prefix_cache_gets_no_salt(fake):
    shared = {"Authorization": "Bearer shared-secret"}
    plain, own = await _salts(fake, SHARED, [(shared, {}), (shared, {"cache_salt": "team"})])
    assert plain is None
    assert own == "team"  # its own salt passes through unchanged


async def test_a_cache_salt_that_is_not_a_string_is_a_400(app, fake):
    r = await call(app, "POST", "/v1/completions", CHAT, {**BODY, "cache_salt": 5})
    assert r.status == 400
    assert r.json()["error"]["param"] == "cache_salt"
