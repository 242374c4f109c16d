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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from vllm_guard.engine_metrics import EngineSample, parse_engine_metrics

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


async def alternating_pairs(
    n: int, measure: Callable[[str], Awaitable[dict[str, Any]]]
) -> list[dict[str, dict[str, Any]]]:
    """`n` pairs of `measure("direct")` and `measure("guard")`, which goes first
    alternating (the machine drifts); for `added_over_pairs`."""
    pairs = []
    for i in range(n):
        pair = {}
        for name in ("direct", "guard") if i % 2 == 0 else ("guard", "direct"):
            pair[name] = await measure(name)
        pairs.append(pair)
    return pairs


def added_over_pairs(pairs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Direct/guard block pairs (each `{"direct": {"p50_ms": ..}, "guard": {..}}`) -> per
    quantile: the median over pairs of guard minus direct (`added_p50_ms`), the lowest and
    highest pair (`added_p50_ms_range`), and each path's median (`direct_p50_ms`)."""
    out: dict[str, Any] = {}
    for q in ("p50_ms", "p99_ms"):
        added = [p["guard"][q] - p["direct"][q] for p in pairs]
        out[f"added_{q}"] = statistics.median(added)
        out[f"added_{q}_range"] = [min(added), max(added)]
        for name in ("direct", "guard"):
            out[f"{name}_{q}"] = statistics.median(p[name][q] for p in pairs)
    return out


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
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = json.loads(line[6:]).get("usage")
            if usage:
                return int(usage["completion_tokens"])
    raise RuntimeError("batch stream ended without usage")


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


def write_report(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """What every benchmark does last: `<name>.json` and `<name>.md` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / name}.json and .md")


# -- KV pressure ------------------------------------------------------------------------


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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def engine_sample(session: aiohttp.ClientSession, vllm_url: str) -> EngineSample:
    async with session.get(vllm_url + "/metrics") as resp:
        return parse_engine_metrics(await resp.text(), time.monotonic())


async def kv_flood(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    n: int,
    vllm_url: str,
    sample_every_s: float = 0.1,
) -> KvFloodResult:
    """`n` identical completions at once to `url`, while vLLM's own /metrics (at
    `vllm_url`, whichever path the flood takes) is sampled for preemptions and queues."""
    before = await engine_sample(session, vllm_url)
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
            s = await engine_sample(session, vllm_url)
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

    watcher = asyncio.create_task(sampler())
    try:
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.monotonic() - t0
        await asyncio.sleep(2 * sample_every_s)
    finally:
        watcher.cancel()
    after = await engine_sample(session, vllm_url)
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
    )
