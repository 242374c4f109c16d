"""What the guard counts is what vLLM runs, and bad input gets a 400: `body.py` alone and
through the app (stand-in engine). The same forms against a real vLLM:
tests/integration/test_counting.py."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio

from tests.conftest import KEYS
from tests.unit.asgi import Client, call
from tests.unit.conftest import ready_app, until
from vllm_guard.config import parse_config
from vllm_guard.core.quota import TOKENS_DAY
from vllm_guard.proxy.body import MAX_COUNTED_INT, ParsedRequest, parse_request
from vllm_guard.proxy.responses import ErrorResponse

COMPLETIONS = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"


def parsed(body: object, path: str = COMPLETIONS) -> ParsedRequest:
    result = parse_request(json.dumps(body).encode(), path)
    assert isinstance(result, ParsedRequest), json.loads(result.body)
    return result


def refused(raw: bytes, path: str = COMPLETIONS) -> dict:
    result = parse_request(raw, path)
    assert isinstance(result, ErrorResponse)
    assert result.status == 400
    return json.loads(result.body)["error"]


@pytest.mark.parametrize(
    ("sent", "read"),
    [("1500", 1500), (1500.0, 1500), (" 1500 ", 1500), ("1_500", 1500), (True, 1), (None, None)],
)
def test_counted_integers_are_read_as_vllm_reads_them(sent, read):
    request = parsed({"prompt": "x", "max_tokens": sent, "max_completion_tokens": sent})
    assert request.payload["max_tokens"] == read and type(request.payload["max_tokens"]) is type(
        read
    )
    assert request.payload["max_completion_tokens"] == read


@pytest.mark.parametrize(
    ("body", "path", "sequences"),
    [
        ({"prompt": "x"}, COMPLETIONS, 1),
        ({"prompt": "x", "n": "16"}, COMPLETIONS, 16),
        ({"prompt": [1, 2, 3]}, COMPLETIONS, 1),
        ({"prompt": ["a", "b", "c"], "n": 2}, COMPLETIONS, 6),
        ({"prompt": [[1, 2], [3]]}, COMPLETIONS, 2),
        ({"messages": [{"role": "user", "content": "x"}], "n": 3.0}, CHAT_PATH, 3),
        ({"messages": [], "n": None}, CHAT_PATH, 1),
    ],
)
def test_sequences_are_prompts_times_n(body, path, sequences):
    assert parsed(body, path).sequences == sequences


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"prompt": "x", "max_tokens": "1e5"}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 1.5}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": -1}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 400 + b"}", "max_tokens"),
        (b'{"prompt": "x", "max_tokens": %d}' % (MAX_COUNTED_INT + 1), "max_tokens"),
        (b'{"prompt": "x", "max_tokens": NaN}', None),
        (b'{"prompt": "x", "temperature": Infinity}', None),
        (b'{"prompt": "x", "temperature": -Infinity}', None),
        (b'{"prompt": "x", "n": 0}', "n"),
        (b'{"prompt": "x", "n": [2]}', "n"),
        (b'{"prompt": "x", "best_of": 4}', "best_of"),
        (b'{"prompt": "x", "use_beam_search": "yes"}', "use_beam_search"),
        (b'{"prompt": "x", "use_beam_search": 7}', "use_beam_search"),
        (b'{"prompt": "x", "prompt_embeds": "AAAA"}', "prompt_embeds"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ],
)
def test_what_cannot_be_counted_or_is_not_json_is_a_400(raw, param):
    error = refused(raw)
    assert error["param"] == param and error["message"]


# -- through the app --------------------------------------------------------------------

CONFIG = """
engine: {max_num_seqs: 8, queue_ahead: 0}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 2}
  batch: {vllm_priority: 10, default_max_tokens: 50, on_limit: reject}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  nightly-etl:
    class: batch
    api_keys: ["env:ETL_KEY"]
    limits: {tokens_per_day: 100000}
"""
CHAT = {"Authorization": "Bearer chat-secret"}
ETL = {"Authorization": "Bearer etl-secret"}


@pytest_asyncio.fixture
async def app(fake):
    app = ready_app(parse_config(CONFIG, "test.yaml", KEYS), fake)
    yield app
    await app.upstream.close()


def charged(app) -> float:
    bucket = app.quota_gates["nightly-etl"].quota.buckets[TOKENS_DAY]
    return bucket.reserved


async def test_a_string_max_tokens_is_charged_and_forwarded_as_the_integer(app, fake):
    fake.mode = "hang"
    body = {"prompt": "abcd", "max_tokens": "1500", "n": "2"}
    task = asyncio.create_task(call(app, "POST", COMPLETIONS, ETL, body))
    await until(lambda: fake.active == 1)
    sent = fake.requests[-1][1]
    assert (sent["max_tokens"], sent["n"]) == (1500, 2)
    assert charged(app) == 4 + 2 * 1500  # the stand-in counts a token per character
    assert app.admission.in_flight == 2  # two sequences, two engine slots
    fake.release.set()
    assert (await task).status == 200
    assert app.admission.in_flight == 0 and charged(app) == 0


async def test_a_list_of_prompts_holds_a_slot_per_prompt(app, fake):
    fake.mode = "hang"
    body = {"prompt": ["a", "b", "c"], "max_tokens": 10}
    task = asyncio.create_task(call(app, "POST", COMPLETIONS, ETL, body))
    await until(lambda: fake.active == 1)
    assert app.admission.in_flight == 3
    assert charged(app) >= 3 * 10  # three completions budgeted
    fake.release.set()
    await task
    assert app.admission.in_flight == 0


async def test_more_sequences_than_the_class_can_run_is_a_400(app, fake):
    # batch may hold 8 - 2 = 6 slots; interactive all 8.
    r = await call(app, "POST", COMPLETIONS, ETL, {"prompt": ["a"] * 4, "n": 2})
    assert r.status == 400 and r.json()["error"]["param"] == "prompt"
    assert "8 sequences" in r.json()["error"]["message"]
    r = await call(app, "POST", COMPLETIONS, CHAT, {"prompt": "a", "n": 8})
    assert r.status == 200
    assert fake.requests[-1][1]["n"] == 8
    assert app.admission.in_flight == 0 and charged(app) == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": "x", "max_tokens": ' + b"9" * 400 + b"}",
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "x", "top_p": Infinity}',
        b'{"prompt": "x", "priority": ' + b"9" * 400 + b"}",
        b'{"prompt": "x", "use_beam_search": true}',
        b'{"prompt": "x", "prompt_embeds": ["AAAA"]}',
    ],
)
async def test_bad_input_is_an_openai_400_and_holds_nothing(app, fake, raw):
    for headers in (CHAT, ETL):
        r = await call(app, "POST", COMPLETIONS, headers, raw)
        assert r.status == 400, r.body[:200]
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert fake.requests == [] and fake.tokenize_calls == 0
    assert app.admission.in_flight == 0 and charged(app) == 0


async def test_several_authorization_headers_are_a_400(app, fake):
    client = Client(b'{"prompt": "x"}')
    scope = {
        "type": "http",
        "method": "POST",
        "path": COMPLETIONS,
        "headers": [(b"authorization", b"Bearer chat-secret"), (b"authorization", b"Bearer x")],
    }
    await app(scope, client.receive, client.send)
    assert client.reply.status == 400 and client.reply.json()["error"]["message"]
    assert fake.requests == []
