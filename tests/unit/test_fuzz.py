"""The whole request path under generated and mutated requests (tests/fuzz_requests.py),
against the app and a stand-in engine: every answer is well-formed, none is a 500, and
after every case nothing is held — engine slots, KV reservations, queue entries, waiting
bytes, quota reservations and concurrency all back to zero."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import KEYS
from tests.fuzz_requests import FuzzCase, fuzz_cases
from tests.unit.asgi import Client
from tests.unit.conftest import ready_app
from tests.unit.fake_upstream import FakeVllm
from vllm_guard.config import parse_config

CONFIG = """
engine: {max_num_seqs: 4, queue_ahead: 1}
guard: {max_body_bytes: 65536}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 1, max_queue: 3, max_wait_s: 1}
  batch: {vllm_priority: 10, max_queue: 5, max_wait_s: 1, default_max_tokens: 64}
tenants:
  chat-ui:
    class: interactive
    api_keys: ["env:CHAT_UI_KEY"]
    limits: {requests_per_minute: 100000, tokens_per_minute: 100000000, max_concurrent: 50}
  nightly-etl:
    class: batch
    api_keys: ["env:ETL_KEY"]
    limits: {tokens_per_day: 1000000000}
"""


@pytest.fixture(scope="module")
def stage():
    """One loop, stand-in engine and app for all cases (hypothesis runs many)."""
    loop = asyncio.new_event_loop()
    fake = FakeVllm()
    loop.run_until_complete(fake.start())
    app = ready_app(parse_config(CONFIG, "fuzz.yaml", KEYS), fake)
    yield loop, fake, app
    loop.run_until_complete(app.upstream.close())
    fake.release.set()
    loop.run_until_complete(fake.stop())
    loop.close()


class _LeavingClient(Client):
    """Leaves after the first piece of the answer."""

    async def send(self, message):
        await super().send(message)
        if message["type"] == "http.response.body":
            self.disconnect()


async def _run(app, case: FuzzCase) -> Client:
    client = (_LeavingClient if case.leave_early else Client)(case.body)
    scope = {"type": "http", "method": "POST", "path": case.path, "headers": case.headers}
    await asyncio.wait_for(app(scope, client.receive, client.send), 10)
    return client


def check_answer(status: int, headers: dict[str, str], body: bytes, complete: bool) -> None:
    assert 200 <= status < 600 and status != 500, (status, body[:300])
    if status >= 400:
        error = json.loads(body)["error"]
        assert error["message"] and error["type"], body
        return
    if not complete:
        return  # the client left; the guard stopped sending
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [e for e in body.split(b"\n\n") if e]
        assert all(e.startswith(b"data: ") for e in events), body[:300]
        assert events[-1] in (b"data: [DONE]",) or b'"error"' in events[-1]
    else:
        json.loads(body)


def check_nothing_held(app) -> None:
    assert app.admission.in_flight == 0
    assert app.admission.kv.reserved == 0
    assert all(s.in_flight == 0 and s.queued == 0 for s in app.admission.statistics())
    assert app.generation.waiting_bytes == 0
    for gate in app.quota_gates.values():
        assert gate.waiting == 0 and gate.quota.in_flight == 0
        assert all(b.reserved == 0 for b in gate.quota.buckets.values())


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=fuzz_cases(), engine=st.sampled_from(["ok", "ok", "ok", "die_mid_stream"]))
def test_any_request_gets_a_well_formed_answer_and_leaves_nothing_held(stage, case, engine):
    loop, fake, app = stage
    fake.mode = engine
    client = loop.run_until_complete(_run(app, case))
    reply = client.reply
    event(f"status {reply.status}")  # --hypothesis-show-statistics: what the cases reach
    check_answer(reply.status, reply.headers, reply.body, reply.complete)
    check_nothing_held(app)
