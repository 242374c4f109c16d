"""The scheduler plugin on the real CPU engine, through `serve` (a stack of its own with
`engine.scheduler: guard`): every slot held by long batch streams, an interactive request
still runs within a step or two — not after a batch request's remaining length — and the
plugin's own metrics show it on the guard's /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.testing.stack import Stack, running_stack

pytestmark = pytest.mark.integration

CONFIG = """
engine: {max_num_seqs: 4, queue_ahead: 2}  # serve's default scheduler: the plugin
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 1}
  batch: {vllm_priority: 10}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"]}
"""
DASHBOARD = Path(__file__).parents[2] / "configs" / "grafana" / "vllm-guard.json"
BATCH_TOKENS = (
    1500  # long enough to outlast the probes on a busy 2-core machine (600 did not, once)
)
PROBES = 3


def _metrics(stack: Stack) -> dict[str, float]:
    return parse_prometheus(httpx.get(stack.guard_url + "/metrics", timeout=30).text)


def _client(stack: Stack, var: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=stack.guard_url + "/v1", api_key=stack.keys[var], max_retries=0, timeout=300
    )


async def _batch(client: openai.AsyncOpenAI, ended: list[float]) -> int:
    stream = await client.completions.create(
        model="tiny",
        prompt="a long batch job",
        max_tokens=BATCH_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    used = 0
    async for chunk in stream:
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    ended.append(time.monotonic())
    return used


async def _probe(client: openai.AsyncOpenAI) -> tuple[float, float]:
    """(time to the first token, time it ended), seconds from its start / monotonic."""
    t0 = time.monotonic()
    first = None
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - t0
    return first if first is not None else float("nan"), time.monotonic()


async def _run() -> dict:
    async with running_stack(CONFIG) as stack:
        before = await asyncio.to_thread(_metrics, stack)
        batch_client, chat = _client(stack, "ETL_KEY"), _client(stack, "CHAT_UI_KEY")
        ended: list[float] = []
        # 4 slots + 4 waiting inside vLLM (no slot reserved with the plugin; batch_queue_ahead
        # defaults to S) + 2 in the guard.
        batch = [asyncio.create_task(_batch(batch_client, ended)) for _ in range(10)]
        deadline = time.monotonic() + 120
        running = ("vllm_guard_engine_requests", "state=running")
        while total(await asyncio.to_thread(_metrics, stack), *running) != 4:
            assert time.monotonic() < deadline, "batch never filled the engine's 4 slots"
            await asyncio.sleep(0.2)
        probes = []
        for _ in range(PROBES):
            probes.append(await _probe(chat))
            await asyncio.sleep(0.3)  # let batch take the freed slot back
        used = await asyncio.gather(*batch)
        await batch_client.close()
        await chat.close()
        await asyncio.sleep(1.5)  # the plugin writes its metrics at least once a second
        return {
            "before": before,
            "after": await asyncio.to_thread(_metrics, stack),
            "probes": probes,
            "batch_ended": ended,
            "batch_used": used,
        }


def test_an_interactive_request_runs_within_a_step_or_two_of_a_full_batch_engine():
    r = asyncio.run(_run())
    before, after = r["before"], r["after"]
    # The plugin runs, and the guard reserves no slot: batch may fill all 4 and queue 4.
    assert "vllm_guard_scheduler_preemptions_total{class=batch,reason=guard}" in before
    assert before["vllm_guard_slot_limit{class=batch}"] == 8
    # Every probe finished while every batch stream still had tokens to go.
    first_end = min(r["batch_ended"])
    assert max(end for _, end in r["probes"]) < first_end, (r["probes"], first_end)
    # Inside the engine: each probe was scheduled within 2 steps of its arrival, by
    # preempting batch; every preempted batch request resumed and produced all its tokens.
    steps = "vllm_guard_scheduler_first_step_delay_steps"
    assert after[f"{steps}_count{{class=interactive}}"] == PROBES
    assert after[f"{steps}_bucket{{class=interactive,le=2.0}}"] == PROBES
    assert after["vllm_guard_scheduler_preemptions_total{class=batch,reason=guard}"] >= 1
    assert (
        after.get("vllm_guard_scheduler_preemptions_total{class=interactive,reason=guard}", 0) == 0
    )
    assert r["batch_used"] == [BATCH_TOKENS] * 10

    # The dashboard's plugin panels query series the guard's /metrics has (the panels'
    # PromQL itself runs against a real Prometheus in test_observability, on the other panels).
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if "plugin" in p["title"]]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"vllm_guard_\w+", e)}
    assert len(panels) >= 3 and names
    for name in names:
        assert any(k.startswith(name + "{") for k in after), name
