"""The isolation workload shared by `vllm-guard demo` and `benchmarks/isolation.py`.

A flood of streaming batch completions (fixed length: `ignore_eos`) saturates the engine
while a series of interactive chat probes measures time to first token (TTFT: until the
first `data:` event, which vLLM sends once the first token exists). The same workload
runs against a `Target`: vLLM directly (its priority policy alone, priorities in the
body) or the guard (priorities from the tenants' classes).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vllm_guard.testing.stack import Stack

PROBE_MAX_TOKENS = 16
PROBE_GAP_S = 0.1


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    interactive_headers: dict[str, str]
    batch_headers: dict[str, str]
    interactive_body: dict[str, Any] = field(default_factory=dict)
    batch_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class FloodResult:
    probe_ttfts_s: list[float]
    probe_starts_s: list[float]
    """When each counted probe was sent, in seconds since the flood started."""
    batch_tokens: int
    batch_elapsed_s: float
    batch_ok: int
    batch_failed: int
    probes_outside_saturation: int

    @property
    def batch_tokens_per_s(self) -> float:
        return self.batch_tokens / self.batch_elapsed_s if self.batch_elapsed_s > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }


def new_session() -> aiohttp.ClientSession:
    # Idle connections go before vLLM's 5 s keep-alive closes them (the direct path),
    # so a probe never races a server-side close ("Cannot write to closing transport").
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3),
        timeout=aiohttp.ClientTimeout(total=900, sock_connect=10),
    )


async def probe(session: aiohttp.ClientSession, target: Target, i: int) -> float:
    """One interactive streaming chat request; returns its TTFT in seconds."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"Probe {i}: say something short."}],
        "max_tokens": PROBE_MAX_TOKENS,
        "stream": True,
        **target.interactive_body,
    }
    start = time.perf_counter()
    ttft: float | None = None
    async with session.post(
        target.base_url + "/v1/chat/completions", json=body, headers=target.interactive_headers
    ) as resp:
        if resp.status != 200:
            raise RuntimeError(f"probe got HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if ttft is None and line.startswith(b"data: "):
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("probe stream had no data")
    return ttft


async def probes_alone(session: aiohttp.ClientSession, target: Target, n: int) -> list[float]:
    out = []
    for i in range(n):
        out.append(await probe(session, target, i))
        await asyncio.sleep(PROBE_GAP_S)
    return out


async def _batch_request(
    session: aiohttp.ClientSession, target: Target, i: int, max_tokens: int, started: list[int]
) -> int:
    body = {
        "model": "tiny",
        "prompt": f"Batch item {i}: write a long report about the sea.",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **target.batch_body,
    }
    async with session.post(
        target.base_url + "/v1/completions", json=body, headers=target.batch_headers
    ) as resp:
        if resp.status != 200:
            raise RuntimeError(f"batch got HTTP {resp.status}")
        first = True
        tail = b""
        async for chunk in resp.content.iter_any():
            if first:
                started[0] += 1
                first = False
            tail = (tail + chunk)[-4096:]
    tokens = completion_tokens(tail)
    if tokens is None:
        raise RuntimeError("batch stream ended without usage")
    return tokens


def completion_tokens(tail: bytes) -> int | None:
    """`usage.completion_tokens` from the last bytes of an SSE stream (its usage chunk,
    sent when `stream_options.include_usage` is set); None if there is none."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = json.loads(line[6:]).get("usage")
            if usage:
                return int(usage["completion_tokens"])
    return None


async def flood_with_probes(
    session: aiohttp.ClientSession,
    target: Target,
    n_flood: int,
    max_tokens: int,
    n_probes: int,
    engine_slots: int,
    min_running: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> FloodResult:
    """Start `n_flood` batch streams at once; while at least `engine_slots` of them remain
    unfinished (the engine stays saturated), run up to `n_probes` sequential probes.
    Probing starts once `min_running` batch streams produce tokens."""
    started = [0]
    done = [0]
    failed = [0]
    tokens = [0]
    t0 = time.perf_counter()
    last_done = [t0]

    async def one(i: int) -> None:
        try:
            n = await _batch_request(session, target, i, max_tokens, started)
            tokens[0] += n  # not `tokens[0] += await ...`: that reads tokens[0] before awaiting
            done[0] += 1
        except Exception:
            failed[0] += 1
        last_done[0] = time.perf_counter()
        if on_progress:
            on_progress(done[0] + failed[0], n_flood)

    tasks = [asyncio.create_task(one(i)) for i in range(n_flood)]

    def saturated() -> bool:
        return n_flood - done[0] - failed[0] >= engine_slots

    wait_until = time.perf_counter() + 60
    while started[0] < min(min_running, n_flood) and time.perf_counter() < wait_until:
        await asyncio.sleep(0.02)
    ttfts: list[float] = []
    starts: list[float] = []
    outside = 0
    i = 0
    while len(ttfts) < n_probes and saturated():
        sent = time.perf_counter() - t0
        ttft = await probe(session, target, i)
        i += 1
        if saturated():
            ttfts.append(ttft)
            starts.append(sent)
        else:
            outside += 1
        await asyncio.sleep(PROBE_GAP_S)
    await asyncio.gather(*tasks)
    return FloodResult(
        probe_ttfts_s=ttfts,
        probe_starts_s=starts,
        batch_tokens=tokens[0],
        batch_elapsed_s=last_done[0] - t0,
        batch_ok=done[0],
        batch_failed=failed[0],
        probes_outside_saturation=outside,
    )


async def warm_up(stack: Stack, n_flood: int, max_tokens: int) -> None:
    """Run the workload once through each path, unmeasured. A fresh vLLM CPU engine
    stalls now and then (seen: 0.3-3.7 s before a new request's first token, on both
    paths) and mostly stops once the same workload has run; new batch shapes are the
    likely cause, and the guard's waves of admissions make other mixes of prefills and
    decodes than a flood sent straight to vLLM. A long-running server is warm, so both
    paths are measured warm."""
    slots = stack.config.max_num_seqs
    async with new_session() as session:
        for target in targets(stack):
            await probes_alone(session, target, 10)
            await flood_with_probes(session, target, n_flood, max_tokens, 0, slots, 1)


def batch_running_at_saturation(stack: Stack, target: Target) -> int:
    """Batch streams that run at once when the flood saturates `target`: every engine
    slot straight to vLLM, the batch class's slot limit through the guard (every slot with
    the scheduler plugin)."""
    slots = stack.config.max_num_seqs
    if target.base_url == stack.vllm_url:
        return slots
    return min(slots, stack.config.classes_by_name["batch"].slot_limit)


def targets(stack: Stack) -> tuple[Target, Target]:
    """The two paths the demo compares: straight to vLLM (with the classes' priorities,
    as vLLM's own priority policy would get them) and through the guard."""
    inter, batch = (
        stack.config.classes_by_name["interactive"],
        stack.config.classes_by_name["batch"],
    )
    direct = Target(
        "direct to vLLM",
        stack.vllm_url,
        stack.engine_headers,
        stack.engine_headers,
        {"priority": inter.vllm_priority},
        {"priority": batch.vllm_priority},
    )
    guard = Target(
        "through vllm-guard",
        stack.guard_url,
        {"Authorization": f"Bearer {stack.keys['CHAT_UI_KEY']}"},
        {"Authorization": f"Bearer {stack.keys['ETL_KEY']}"},
    )
    return direct, guard
