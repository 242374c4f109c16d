"""Requests through the guard to a real vLLM, with the official openai SDK."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.integration


def test_chat_non_streaming(stack):
    raw = stack.client().chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    done = raw.parse()
    assert raw.headers["x-vllm-guard-class"] == "interactive"
    assert float(raw.headers["x-vllm-guard-queue-ms"]) >= 0
    assert done.usage.completion_tokens <= 8 and done.usage.prompt_tokens > 0
    assert done.choices[0].finish_reason in ("length", "stop")


def test_chat_streaming(stack):
    stream = stack.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    # Tokens are counted from usage: vLLM puts several tokens in one chunk when its output
    # runs ahead of the stream, so the number of chunks is not the number of tokens.
    assert chunks[-1].usage.completion_tokens == 12
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completions_both_ways(stack):
    client = stack.client("ETL_KEY")
    done = client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert done.usage.completion_tokens == 5
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="Once upon",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    # From usage, not by counting chunks (a chunk can carry several tokens; a clean-clone CI
    # run saw 4 chunks for 5 tokens).
    assert chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_bad_key_is_401(stack):
    with pytest.raises(openai.AuthenticationError) as info:
        stack.client().with_options(api_key="not-a-key").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"


def test_downgrade_header_is_honoured(stack):
    raw = stack.client().completions.with_raw_response.create(
        model="tiny", prompt="x", max_tokens=2, extra_headers={"x-vllm-guard-class": "batch"}
    )
    assert raw.headers["x-vllm-guard-class"] == "batch"


def test_upgrade_header_is_refused(stack):
    with pytest.raises(openai.PermissionDeniedError) as info:
        stack.client("ETL_KEY").completions.create(
            model="tiny",
            prompt="x",
            max_tokens=2,
            extra_headers={"x-vllm-guard-class": "interactive"},
        )
    assert info.value.body["code"] == "class_not_allowed"


def test_vllm_errors_pass_through(stack):
    with pytest.raises(openai.BadRequestError) as info:
        stack.client().completions.create(model="tiny", prompt="x", max_tokens=100_000)
    assert "max" in str(info.value).lower()
    stack.wait_idle()


def test_models_listed_after_auth(stack):
    assert [m.id for m in stack.client().models.list()] == ["tiny"]


def test_malformed_json_is_400(stack):
    import httpx

    r = httpx.post(
        stack.url + "/v1/chat/completions",
        content=b"{oops",
        headers={"Authorization": "Bearer it-chat-key-5b1f"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
