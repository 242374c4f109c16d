"""Does keeping a conversation on one engine pay? Session affinity on and off, one run.

    python benchmarks/affinity.py [--conversations 12] [--turns 6] [--reps 2]
                                  [--out results/affinity]

Two tiny vLLMs (`vllm-guard serve --model tiny`, 8 slots each, prefix caching on, as vLLM
defaults; computing on cores 0 and 1) and two `vllm-guard proxy`s over both:
`engine.affinity: session` and `none`.
Per repetition, each proxy in turn (alternating which goes first) runs `--conversations`
chats at once, `--turns` turns each: every turn sends the whole history plus a new user
message of ~200 random words (so a conversation's prefix is cached only where it ran
before), streaming, 32 tokens, with the conversation's `x-session-id`, then waits 0-0.5 s
(so conversations interleave differently turn by turn). Measured per proxy:
TTFT of turns 2.. (p50, p95) and vLLM's prefix-cache hit rate over both engines
(`vllm:prefix_cache_hits_total` / `_queries_total`, the change during the run).
Writes affinity.json and affinity.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import write_report
from engines import KEYS, SLOTS, two_engines, vllm_metrics

from vllm_guard.demo.workload import new_session, percentile
from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.prometheus import total
from vllm_guard.testing.stack import Stack, start_proxy, stop, wait_healthy

PROXY_CONFIG = f"""
engine:
  {{max_num_seqs: {SLOTS}, scheduler: vllm, affinity: {{affinity}}, affinity_slack: {{slack}}}}
guard: {{engine_key: "env:VLLM_GUARD_ENGINE_KEY"}}
classes:
  interactive: {{vllm_priority: 0, max_wait_s: 60}}
tenants:
  chat-ui: {{class: interactive, api_keys: ["env:CHAT_UI_KEY"]}}
"""
WORDS = [f"w{i}" for i in range(5000)]


async def _conversation(
    session: aiohttp.ClientSession, url: str, name: str, turns: int, rng: random.Random,
    ttfts: list[float],
) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {KEYS['CHAT_UI_KEY']}", "x-session-id": name}
    messages: list[dict[str, str]] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=200))})
        body = {"model": "tiny", "messages": messages, "max_tokens": 32, "stream": True}
        sent = time.perf_counter()
        first = None
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200, (r.status, await r.text())
            async for line in r.content:
                if line.startswith(b"data: {"):
                    first = first or time.perf_counter() - sent
        if turn > 0 and first is not None:
            ttfts.append(first)
        messages.append({"role": "assistant", "content": f"reply {turn} of {name}"})
        await asyncio.sleep(rng.uniform(0, 0.5))  # the user reads and types: turns interleave


def _cache(stacks: list[Stack]) -> tuple[float, float]:
    hits = queries = 0.0
    for s in stacks:
        m = vllm_metrics(s)
        hits += total(m, "vllm:prefix_cache_hits_total")
        queries += total(m, "vllm:prefix_cache_queries_total")
    return hits, queries


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="affinity-"))
    a, b = two_engines(work)
    procs: dict[str, Any] = {}
    urls: dict[str, str] = {}
    runs: list[dict[str, Any]] = []
    try:
        for s in (a, b):
            s.start()
        for s in (a, b):
            await s.wait_ready()
        env = {**KEYS, "VLLM_GUARD_ENGINE_KEY": a.engine_key}
        for mode in ("session", "none"):
            config = work / f"{mode}.yaml"
            config.write_text(
                PROXY_CONFIG.replace("{affinity}", mode).replace("{slack}", str(args.slack))
            )
            port, log = free_port(), work / f"proxy-{mode}.log"
            extra = ("--upstream", b.vllm_url)
            procs[mode] = start_proxy(a.vllm_url, config, port, env, log, extra_args=extra)
            urls[mode] = f"http://127.0.0.1:{port}"
            wait_healthy(urls[mode], procs[mode], 60, log)
        print("engines and proxies ready", flush=True)
        rng = random.Random(7)
        for rep in range(args.reps):
            for mode in ("session", "none") if rep % 2 == 0 else ("none", "session"):
                hits0, queries0 = await asyncio.to_thread(_cache, [a, b])
                ttfts: list[float] = []
                started = time.monotonic()
                async with new_session() as session:
                    await asyncio.gather(*(
                        _conversation(session, urls[mode], f"r{rep}-{mode}-c{i}", args.turns,
                                      random.Random(rng.random()), ttfts)
                        for i in range(args.conversations)
                    ))  # fmt: skip
                hits1, queries1 = await asyncio.to_thread(_cache, [a, b])
                run = {
                    "rep": rep,
                    "affinity": mode,
                    "elapsed_s": time.monotonic() - started,
                    "ttft_p50_ms": percentile(ttfts, 50) * 1000,
                    "ttft_p95_ms": percentile(ttfts, 95) * 1000,
                    "turns_measured": len(ttfts),
                    "prefix_cache_hit_rate": (hits1 - hits0) / max(1.0, queries1 - queries0),
                }
                runs.append(run)
                print(run, flush=True)
    finally:
        for proc in procs.values():
            stop(proc)
        for s in (a, b):
            s.stop()
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "args": vars(args) | {"out": str(args.out)},
        "runs": runs,
    }


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Session affinity across two engines",
        "",
        f"{r['when']}, {r['cpus']} CPUs, two tiny vLLMs ({SLOTS} slots each) on the same cores, "
        f"{r['args']['conversations']} conversations at once, {r['args']['turns']} turns "
        "each (whole history + ~200 new words per turn, 32-token streamed replies, 0-0.5 s "
        "between turns), "
        f"`x-session-id` per conversation, `affinity_slack` {r['args']['slack']}; TTFT over "
        "turns 2 onwards.",
        "",
        "| rep | engine.affinity | TTFT p50 | TTFT p95 | prefix-cache hit rate | run time |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for run in r["runs"]:
        lines.append(
            f"| {run['rep'] + 1} | {run['affinity']} | {run['ttft_p50_ms']:.0f} ms | "
            f"{run['ttft_p95_ms']:.0f} ms | {run['prefix_cache_hit_rate']:.1%} | "
            f"{run['elapsed_s']:.1f} s |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--slack", type=int, default=2, help="engine.affinity_slack (default 2)")
    p.add_argument("--out", type=Path, default=Path("results/affinity"))
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "affinity", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
