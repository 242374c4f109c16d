"""A hung engine on the real CPU build, through `serve` (a stack of its own): the engine
core process stops while the API server keeps answering `/health` 200 and `/metrics` with
frozen numbers. The guard notices from the token counters that stopped moving, answers
503, ends the stream in flight with an error event, and after `hang_restart_after_s`
kills and restarts vLLM, which then serves again."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.testing.stack import Stack, running_stack

pytestmark = pytest.mark.integration

CONFIG = """
engine: {max_num_seqs: 4, scheduler: vllm, hang_detect_s: 3, hang_restart_after_s: 10}
guard: {unavailable_retry_after_s: 2}
classes:
  interactive: {vllm_priority: 0}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
"""


def _engine_core(stack: Stack) -> int:
    return stack.vllm_pids()[1]


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.guard_url + "/v1",
        api_key=stack.keys["CHAT_UI_KEY"],
        max_retries=0,
        timeout=120,
    )


async def _run() -> dict:
    async with running_stack(CONFIG) as stack:
        client = _client(stack)
        outcome: dict = {}
        flowing = threading.Event()

        def stream() -> None:
            try:
                for chunk in client.completions.create(
                    model="tiny",
                    prompt="a long story",
                    max_tokens=3000,
                    stream=True,
                    extra_body={"ignore_eos": True},
                ):
                    if chunk.choices:
                        flowing.set()
                outcome["stream"] = "completed"
            except openai.APIError as exc:
                outcome["stream"] = f"error: {exc}"
            outcome["ended_at"] = time.monotonic()

        reader = threading.Thread(target=stream)
        reader.start()
        assert flowing.wait(60)
        core = _engine_core(stack)
        os.kill(core, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            deadline = stopped + 10
            while httpx.get(stack.guard_url + "/health").status_code == 200:
                assert time.monotonic() < deadline, "the guard did not notice within 10 s"
                time.sleep(0.2)
            outcome["noticed_after_s"] = time.monotonic() - stopped
            try:
                client.completions.create(model="tiny", prompt="hi", max_tokens=2)
                outcome["new_request"] = 200
            except openai.APIStatusError as exc:
                outcome["new_request"] = exc.status_code
            reader.join(30)
            outcome["stream_ended_after_s"] = outcome.get("ended_at", 1e9) - stopped
            # Then it is killed and restarted; afterwards it serves again.
            deadline = time.monotonic() + 240
            while httpx.get(stack.guard_url + "/health").status_code != 200:
                assert time.monotonic() < deadline, stack.log_tail()
                time.sleep(1)
            outcome["after_restart"] = client.completions.create(
                model="tiny", prompt="hi", max_tokens=2
            ).usage.completion_tokens
            metrics = parse_prometheus(httpx.get(stack.guard_url + "/metrics").text)
            outcome["restarts"] = total(metrics, "vllm_guard_engine_restarts")
            outcome["log"] = stack.guard_log.read_text()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(core, signal.SIGCONT)
            client.close()
        return outcome


def test_a_stopped_engine_core_is_noticed_ended_and_restarted():
    import asyncio

    r = asyncio.run(_run())
    assert r["noticed_after_s"] < 10
    assert r["new_request"] == 503
    assert r["stream"].startswith("error"), r["stream"]
    assert r["stream_ended_after_s"] < 10
    assert "produced no token" in r["log"]
    assert r["after_restart"] == 2
    assert r["restarts"] >= 1
