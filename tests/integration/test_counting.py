"""What the guard counts is what vLLM runs: each form of a generation request that makes
vLLM run more (or other) than it looks, the guard's charge and in-flight count against
vLLM's own usage and running count. `counted` has a tokens/day budget large enough never
to refuse; its charged and used tokens are read from the guard's metrics."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

TOKENS = "vllm_guard_tenant_tokens_total"


def _tokens(stack, kind: str) -> float:
    try:
        return stack.guard_metric(TOKENS, f'kind="{kind}",tenant="counted"')
    except KeyError:  # no request of the tenant settled yet
        return 0.0


def _settled(stack, before: dict[str, float]) -> dict[str, float]:
    """Charged and used tokens since `before`, once the guard settled the request (just
    after the client had its answer)."""
    for _ in range(100):
        now = {kind: _tokens(stack, kind) for kind in before}
        if now["used"] > before["used"]:
            return {kind: now[kind] - before[kind] for kind in before}
        time.sleep(0.05)
    raise AssertionError("the request was not settled")


@pytest.mark.parametrize(
    ("extra", "sequences", "exact_prompt"),
    [
        ({"prompt": "count me", "max_tokens": "7"}, 1, True),
        ({"prompt": "count me", "max_tokens": 7.0}, 1, True),
        ({"prompt": "count me", "max_tokens": 7, "n": "2"}, 2, True),
        ({"prompt": ["one", "two", "three"], "max_tokens": 7}, 3, False),
        ({"prompt": [[5, 6, 7], [8, 9]], "max_tokens": "7"}, 2, True),
    ],
)
def test_the_charge_covers_every_sequence_vllm_runs(stack, extra, sequences, exact_prompt):
    before = {kind: _tokens(stack, kind) for kind in ("charged", "used")}
    with stack.client("COUNTED_KEY") as client:
        completion = client.completions.create(
            model="tiny", prompt="", extra_body={**extra, "ignore_eos": True}
        )
    usage = completion.usage
    assert usage.completion_tokens == 7 * sequences  # vLLM ran every sequence
    assert len(completion.choices) == sequences
    delta = _settled(stack, before)
    charged = delta["charged"]
    assert delta["used"] == usage.total_tokens  # settled with vLLM's usage
    assert charged >= usage.completion_tokens + (usage.prompt_tokens if exact_prompt else 0)
    if exact_prompt:  # /tokenize or token ids: the charge is exactly what vLLM ran
        assert charged == usage.total_tokens
    stack.wait_idle()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
        ("/completions", {"prompt": "x", "prompt_embeds": "AAAA"}, "prompt_embeds"),
        ("/chat/completions", {"messages": [], "best_of": "2"}, "best_of"),
        ("/completions", {"prompt": ["x"] * 4, "n": 2}, "prompt"),  # 8 > the 4 slots
    ],
)
def test_forms_the_guard_cannot_count_are_a_clear_400(stack, path, body, param):
    with stack.client("COUNTED_KEY") as client, pytest.raises(openai.BadRequestError) as bad:
        client.post(path, body={"model": "tiny", **body}, cast_to=httpx.Response)
    assert bad.value.body["param"] == param
    assert "vllm-guard" in bad.value.body["message"] or "sequences" in bad.value.body["message"]
    stack.wait_idle()


def test_in_flight_counts_the_sequences_vllm_runs(stack):
    """A list of 3 prompts: the guard holds 3 slots while vLLM runs 3 requests."""
    seen: list[tuple[float, float]] = []
    done = threading.Event()

    with stack.client("CHAT_UI_KEY") as client:
        stream = client.completions.create(
            model="tiny",
            prompt=["a", "b", "c"],
            max_tokens=900,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for i, _ in enumerate(stream):
            if i == 30 and not done.is_set():
                seen.append(
                    (
                        stack.guard_metric("vllm_guard_in_flight", 'class="interactive"'),
                        stack.vllm_metric("vllm:num_requests_running"),
                    )
                )
                done.set()
    assert seen == [(3.0, 3.0)]
    stack.wait_idle()
