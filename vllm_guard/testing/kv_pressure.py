"""A KV-cache overload on a stack with a deliberately small cache: the workload of
benchmarks/kv_pressure.py and of the KV integration test (tests/integration/test_kv_pressure.py).

`--num-gpu-blocks-override 40`: 40 blocks x 128 = 5,120 tokens (max_model_len 1024), 16
engine slots, so 16 long requests cannot all fit: sent straight to vLLM it runs out of
blocks mid-decode and preempts. `compare` sends the same flood straight to vLLM and through
the guard, sampling vLLM's /metrics every 100 ms on both runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from vllm_guard.demo.workload import PROBE_GAP_S, new_session
from vllm_guard.testing.stack import Stack
from vllm_guard.upstream.monitor import EngineSample, parse_engine_metrics

BLOCKS = 40
BLOCK_SIZE = 128  # vLLM's CPU backend
MAX_MODEL_LEN = 1024  # vLLM refuses to start when one sequence of max_model_len cannot fit
VLLM_ARGS = ("--num-gpu-blocks-override", str(BLOCKS), "--max-model-len", str(MAX_MODEL_LEN))
CONFIG = """
engine: {max_num_seqs: 16, kv_watermark: 0.9, scheduler: vllm}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 2, reserved_kv: 0.2}
  batch: {vllm_priority: 10, max_queue: 1000, max_wait_s: 900}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"]}
"""
WORDS = [
    "the",
    "guard",
    "keeps",
    "batch",
    "work",
    "out",
    "of",
    "reserved",
    "slots",
    "so",
    "chat",
    "stays",
    "fast",
]


async def long_prompt(
    session: aiohttp.ClientSession, vllm_url: str, tokens: int, headers: dict[str, str]
) -> str:
    """Random words, grown until vLLM's tokenizer counts at least `tokens`."""
    rng = random.Random(7)
    words: list[str] = []
    count = 0
    while count < tokens:
        words += rng.choices(WORDS, k=max(8, (tokens - count) // 3))
        body = {"model": "tiny", "prompt": " ".join(words)}
        async with session.post(vllm_url + "/tokenize", json=body, headers=headers) as resp:
            count = (await resp.json())["count"]
    return " ".join(words)


async def compare(stack: Stack, n: int, prompt_tokens: int, max_tokens: int) -> dict[str, Any]:
    """The flood straight to vLLM, then through the guard, on a running `stack`."""
    async with new_session() as session:
        engine = stack.engine_headers
        prompt = await long_prompt(session, stack.vllm_url, prompt_tokens, engine)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
        etl = {"Authorization": f"Bearer {stack.keys['ETL_KEY']}"}
        direct = await kv_flood(
            session, stack.vllm_url, engine, {**body, "priority": 10}, n, stack.vllm_url, engine
        )
        guard = await kv_flood(session, stack.guard_url, etl, body, n, stack.vllm_url, engine)
    return {"direct": summary(direct), "guard": summary(guard)}


def summary(r: KvFloodResult) -> dict[str, Any]:
    return {**asdict(r), "tokens_per_s": r.tokens_per_s}


@dataclass
class KvFloodResult:
    ok: int
    failed: int
    statuses: dict[int, int]
    tokens: int
    elapsed_s: float
    preemptions: int
    """New `vllm:num_preemptions_total` during the flood."""
    waiting_max: int
    running_max: int
    timeline: list[tuple[float, float, int, int, int]]
    """(s since start, KV usage, running, waiting, preemptions so far), one per sample."""
    probe_ttfts_s: list[float]
    """TTFTs of the interactive probes sent one after another during the flood, if any."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def engine_sample(
    session: aiohttp.ClientSession, vllm_url: str, headers: dict[str, str]
) -> EngineSample:
    async with session.get(vllm_url + "/metrics", headers=headers) as resp:
        return parse_engine_metrics(await resp.text(), time.monotonic())


async def kv_flood(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    n: int,
    vllm_url: str,
    vllm_headers: dict[str, str],
    sample_every_s: float = 0.1,
    probe: Callable[[int], Awaitable[float]] | None = None,
) -> KvFloodResult:
    """`n` identical completions at once to `url`, while vLLM's own /metrics (at
    `vllm_url`, whichever path the flood takes) is sampled for preemptions and queues;
    with `probe`, interactive probes (returning their TTFT) one after another until the
    flood is done."""
    before = await engine_sample(session, vllm_url, vllm_headers)
    ttfts: list[float] = []
    statuses: dict[int, int] = {}
    tokens = [0]
    timeline: list[tuple[float, float, int, int, int]] = []
    t0 = time.monotonic()

    async def one() -> None:
        try:
            async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
                data = await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    tokens[0] += json.loads(data)["usage"]["completion_tokens"]
        except (aiohttp.ClientError, TimeoutError):
            statuses[0] = statuses.get(0, 0) + 1

    async def sampler() -> None:
        while True:
            s = await engine_sample(session, vllm_url, vllm_headers)
            timeline.append(
                (
                    s.at - t0,
                    s.kv_usage or 0.0,
                    s.running or 0,
                    s.waiting or 0,
                    (s.preemptions or 0) - (before.preemptions or 0),
                )
            )
            await asyncio.sleep(sample_every_s)

    async def prober(flood: asyncio.Future[Any]) -> None:
        assert probe is not None
        i = 0
        while not flood.done():
            ttft = await probe(i)
            if not flood.done():  # count only probes that met the whole flood
                ttfts.append(ttft)
            i += 1
            await asyncio.sleep(PROBE_GAP_S)

    watcher = asyncio.create_task(sampler())
    try:
        flood = asyncio.gather(*(one() for _ in range(n)))
        probing = asyncio.create_task(prober(flood)) if probe is not None else None
        await flood
        elapsed = time.monotonic() - t0
        if probing is not None:
            await probing
        await asyncio.sleep(2 * sample_every_s)
    finally:
        watcher.cancel()
    after = await engine_sample(session, vllm_url, vllm_headers)
    return KvFloodResult(
        ok=statuses.get(200, 0),
        failed=n - statuses.get(200, 0),
        statuses=statuses,
        tokens=tokens[0],
        elapsed_s=elapsed,
        preemptions=(after.preemptions or 0) - (before.preemptions or 0),
        waiting_max=max((w for _, _, _, w, _ in timeline), default=0),
        running_max=max((r for _, _, r, _, _ in timeline), default=0),
        timeline=timeline,
        probe_ttfts_s=ttfts,
    )
