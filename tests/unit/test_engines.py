"""Several engines behind one guard (fake upstreams): requests spread by free slots, an
engine that refuses connections is taken out and its requests go to another, none lost."""

from __future__ import annotations

import asyncio

import pytest_asyncio

from tests.conftest import BASE_CONFIG, KEYS
from tests.unit.asgi import call
from tests.unit.conftest import until
from tests.unit.fake_upstream import FakeVllm
from vllm_guard.config import parse_config
from vllm_guard.engine.state import EngineState
from vllm_guard.proxy.app import GuardApp
from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.upstream.connections import Upstream

ETL = {"Authorization": "Bearer etl-secret"}
BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


@pytest_asyncio.fixture
async def fakes():
    made = [FakeVllm(), FakeVllm()]
    for f in made:
        await f.start()
    yield made
    for f in made:
        f.release.set()
        await f.stop()


@pytest_asyncio.fixture
async def make_app():
    """Apps over several upstreams (each ready), their connections closed afterwards."""
    made: list[GuardApp] = []

    def make(urls: list[str]) -> GuardApp:
        config = parse_config(BASE_CONFIG, "t.yaml", KEYS)
        engines = [EngineState() for _ in urls]
        for e in engines:
            e.set("ready")
        made.append(GuardApp(config, [Upstream(u, config.guard) for u in urls], engines))
        return made[-1]

    yield make
    for app in made:
        for up in app.upstreams:
            await up.close()


async def test_requests_spread_over_engines_and_each_engine_counts_its_own(fakes, make_app):
    app = make_app([f.url for f in fakes])
    for f in fakes:
        f.mode = "hang"  # answer once released
    tasks = [asyncio.create_task(call(app, "POST", "/v1/completions", ETL, BODY)) for _ in range(6)]
    await until(lambda: sum(len(f.requests) for f in fakes) == 6)
    assert [len(f.requests) for f in fakes] == [3, 3]  # batch: 3 of 4 slots on each
    assert [e.in_flight for e in app.admission.engines] == [3, 3]
    metrics = parse_prometheus((await call(app, "GET", "/metrics")).body.decode())
    assert total(metrics, "vllm_guard_engine_in_flight", f"engine={app.upstreams[1].label}") == 3
    for f in fakes:
        f.release.set()
    assert all(r.status == 200 for r in await asyncio.gather(*tasks))
    assert [e.in_flight for e in app.admission.engines] == [0, 0]


async def test_a_refusing_engine_is_taken_out_and_its_request_goes_to_another(fakes, make_app):
    # Engine 0: the discard port, connection refused; engine 1: answers.
    app = make_app(["http://127.0.0.1:9", fakes[1].url])
    answers = [await call(app, "POST", "/v1/completions", ETL, BODY) for _ in range(4)]
    assert [r.status for r in answers] == [200] * 4  # none lost
    assert len(fakes[1].requests) == 4
    assert not app.engines[0].ready and app.engines[0].phase == "unreachable"
    assert [e.up for e in app.admission.engines] == [False, True]
    metrics = parse_prometheus((await call(app, "GET", "/metrics")).body.decode())
    assert total(metrics, "vllm_guard_engine_failovers_total", "engine=127.0.0.1:9") == 1
    assert total(metrics, "vllm_guard_engine_up", "engine=127.0.0.1:9") == 0
    assert total(metrics, "vllm_guard_requests_total", "outcome=ok") == 4
    # Its health check passes again: back in rotation.
    app.engines[0].set("ready")
    assert app.admission.engines[0].up


async def test_with_every_engine_refusing_the_client_gets_503_and_nothing_is_held(make_app):
    app = make_app(["http://127.0.0.1:9", "http://127.0.0.1:7"])
    r = await call(app, "POST", "/v1/completions", ETL, BODY)
    assert r.status == 503 and "retry-after" in r.headers
    assert app.admission.in_flight == 0
    r = await call(app, "POST", "/v1/completions", ETL, BODY)  # both out of rotation now
    assert r.status == 503 and r.json()["error"]["code"] == "engine_unavailable"


async def test_a_sessions_requests_stay_on_its_engine_while_it_has_room(fakes, make_app):
    app = make_app([f.url for f in fakes])
    fakes[0].mode = "hang"
    held = asyncio.create_task(call(app, "POST", "/v1/completions", ETL, BODY))
    await until(lambda: len(fakes[0].requests) == 1)  # engine 0: one slot taken
    session = {**ETL, "x-session-id": "conversation-1"}
    assert (await call(app, "POST", "/v1/completions", session, BODY)).status == 200
    assert len(fakes[1].requests) == 1  # the roomier engine
    fakes[0].release.set()
    assert (await held).status == 200
    # Both engines idle now; without affinity the next requests would go to engine 0.
    for _ in range(2):
        assert (await call(app, "POST", "/v1/completions", session, BODY)).status == 200
    assert len(fakes[1].requests) == 3 and len(fakes[0].requests) == 1
    other = {**ETL, "x-session-id": "conversation-2"}
    assert (await call(app, "POST", "/v1/completions", other, BODY)).status == 200
    assert len(fakes[0].requests) == 2  # a new session: the roomiest (first on a tie)
