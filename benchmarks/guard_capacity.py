"""How many requests/s the guard alone sustains on one core, its CPU time per request, and
the latency it adds at vLLM's pace when it has its own core.

    python benchmarks/guard_capacity.py [--seconds 10] [--concurrency 32] [--pace-ms 100]

A trivial upstream (an aiohttp server answering every chat request with the same small
JSON) stands in for vLLM, so only the guard's own work is measured. The guard runs as
`vllm-guard proxy` pinned to CPU 0 (`sched_setaffinity`); the upstream and the load
generator share the other CPUs. The guard's CPU time comes from /proc (user + system).

1. Capacity: the upstream answers at once and `--concurrency` clients send as fast as
   they can, straight to it (what the generator and upstream do without the guard) and
   through the guard.
2. Added latency: the upstream waits `--pace-ms` before answering (about what vLLM takes
   at concurrency 32 on the tiny model), so the closed loop runs at a rate vLLM could
   serve; blocks straight to it and through the guard alternate (`--pairs` pairs), and the
   added p50/p99 is the median over pairs of guard minus direct.

Writes guard_capacity.json and guard_capacity.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from common import added_over_pairs, alternating_pairs, write_report

from vllm_guard.demo.workload import percentile
from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.stack import start_proxy, stop

CONFIG = """
engine: {max_num_seqs: 1024}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 8, max_queue: 10000}
  batch: {vllm_priority: 10, max_queue: 10000}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
"""
KEY = "capacity-benchmark-key"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
ANSWER = json.dumps(
    {
        "id": "cmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()


def serve_trivial_upstream(port: int) -> None:
    """The stand-in for vLLM (run in a child process). `PUT /delay?ms=N` (sent straight to
    it, never through the guard) sets how long it waits before answering a chat request."""
    delay_s = 0.0

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.Response(body=ANSWER, content_type="application/json")

    async def set_delay(request: web.Request) -> web.Response:
        nonlocal delay_s
        delay_s = float(request.query["ms"]) / 1000
        return web.Response(text="")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_put("/delay", set_delay)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)  # no KV data: the guard admits by slots alone
    app.router.add_get("/v1/models", lambda r: web.json_response({"data": []}))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(url: str, headers: dict[str, str], seconds: float, concurrency: int) -> dict:
    connector = aiohttp.TCPConnector(limit=concurrency)
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        for _ in range(50):  # warm the connections
            async with session.post(url + "/v1/chat/completions", json=BODY) as resp:
                await resp.read()
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                async with session.post(url + "/v1/chat/completions", json=BODY) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "requests": len(latencies),
        "errors": errors,
        "elapsed_s": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


async def _wait_ok(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never became healthy")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    guard_cpu, others = cpus[0], set(cpus[1:]) or {cpus[0]}
    up_port, guard_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--serve-upstream", str(up_port)],
        preexec_fn=lambda: os.sched_setaffinity(0, others),
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CONFIG)
    guard = start_proxy(
        f"http://127.0.0.1:{up_port}",
        Path(f.name),
        guard_port,
        {"CHAT_UI_KEY": KEY},
        preexec_fn=lambda: os.sched_setaffinity(0, {guard_cpu}),
        log_level="warning",
    )
    os.sched_setaffinity(0, others)
    up_url, guard_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{guard_port}"
    try:
        await _wait_ok(up_url)
        await _wait_ok(guard_url)
        await asyncio.sleep(2.5)  # the proxy's first health poll marks the engine ready
        direct = await _load(up_url, {}, args.seconds, args.concurrency)
        cpu0 = _cpu_s(guard.pid)
        through = await _load(
            guard_url, {"Authorization": f"Bearer {KEY}"}, args.seconds, args.concurrency
        )
        cpu = _cpu_s(guard.pid) - cpu0
        paced = await _paced(up_url, guard_url, args)
    finally:
        for p in (guard, upstream):
            stop(p, 10)
        os.unlink(f.name)
    through["guard_cpu_s"] = cpu
    through["guard_cpu_ms_per_request"] = cpu * 1000 / max(through["requests"], 1)
    through["guard_core_utilisation"] = cpu / through["elapsed_s"]
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "args": vars(args) | {"out": str(args.out)},
        "guard_cpu": guard_cpu,
        "direct": direct,
        "guard": through,
        "paced": paced,
    }


async def _paced(up_url: str, guard_url: str, args: argparse.Namespace) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"{up_url}/delay", params={"ms": str(args.pace_ms)}) as resp,
    ):
        resp.raise_for_status()
    paths = {"direct": (up_url, {}), "guard": (guard_url, {"Authorization": f"Bearer {KEY}"})}
    pairs = await alternating_pairs(
        args.pairs, lambda name: _load(*paths[name], args.seconds / 2, args.concurrency)
    )
    out: dict[str, Any] = {"pace_ms": args.pace_ms, "pairs": pairs, **added_over_pairs(pairs)}
    out["requests_per_s"] = statistics.median(p["guard"]["requests_per_s"] for p in pairs)
    return out


def _markdown(r: dict[str, Any]) -> str:
    d, g, pc = r["direct"], r["guard"], r["paced"]
    return "\n".join(
        [
            "# Guard capacity on one core (trivial upstream)",
            "",
            f"{r['when']}, {r['cpus']} CPUs; the guard (`vllm-guard proxy`) pinned to CPU "
            f"{r['guard_cpu']}, upstream and load generator on the others; "
            f"{r['args']['concurrency']} concurrent clients, {r['args']['seconds']:g} s, "
            "non-streaming chat requests answered at once by the stand-in upstream.",
            "",
            "| path | requests/s | p50 | p99 | errors |",
            "|---|---:|---:|---:|---:|",
            f"| straight to the trivial upstream | {d['requests_per_s']:.0f} | "
            f"{d['p50_ms']:.2f} ms | {d['p99_ms']:.2f} ms | {d['errors']} |",
            f"| through the guard | **{g['requests_per_s']:.0f}** | {g['p50_ms']:.2f} ms | "
            f"{g['p99_ms']:.2f} ms | {g['errors']} |",
            "",
            f"Guard CPU: {g['guard_cpu_s']:.2f} s for {g['requests']} requests = "
            f"**{g['guard_cpu_ms_per_request']:.3f} ms per request** "
            f"({g['guard_core_utilisation']:.0%} of its core).",
            "",
            f"## Added latency at vLLM's pace (upstream answers after {pc['pace_ms']:g} ms)",
            "",
            f"{r['args']['concurrency']} concurrent clients, {len(pc['pairs'])} alternating "
            f"pairs of {r['args']['seconds'] / 2:g} s blocks (through the guard: "
            f"{pc['requests_per_s']:.0f} requests/s); added = median over pairs of guard minus "
            "direct, lowest and highest pair in brackets.",
            "",
            "| | direct | through the guard | added |",
            "|---|---:|---:|---:|",
            *(
                f"| {q[:3]} | {pc[f'direct_{q}']:.2f} ms | {pc[f'guard_{q}']:.2f} ms | "
                f"**{pc[f'added_{q}']:+.2f} ms** [{pc[f'added_{q}_range'][0]:+.2f}, "
                f"{pc[f'added_{q}_range'][1]:+.2f}] |"
                for q in ("p50_ms", "p99_ms")
            ),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--pace-ms", type=float, default=100.0, help="the upstream's delay, phase 2")
    p.add_argument("--pairs", type=int, default=6, help="direct/guard block pairs, phase 2")
    p.add_argument("--out", type=Path, default=Path("results/guard_capacity"))
    p.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_upstream:
        serve_trivial_upstream(args.serve_upstream)
        return 0
    result = asyncio.run(_run(args))
    write_report(args.out, "guard_capacity", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
