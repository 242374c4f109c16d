"""`vllm-guard demo`: the whole product on a CPU, and what it changes, in a few minutes.

Starts `vllm-guard serve --model tiny` (the embedded limits: 16 engine slots, 2 reserved
for interactive), then runs the isolation workload twice: straight to vLLM's private port
(vLLM's priority policy alone) and through the guard. Prints interactive TTFT alone and
under a batch flood, and batch tokens/s, for both paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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

console = Console()

ISOLATION_GOAL = 3.0  # guard: flood p95 within 3x of alone p95
CONSERVATION_GOAL = 0.85  # guard batch tokens/s at least 85% of direct


async def measure(
    stack: Stack, target: Target, n_flood: int, max_tokens: int, n_probes: int
) -> dict[str, Any]:
    slots = stack.config.max_num_seqs
    min_running = batch_running_at_saturation(stack, target)
    async with new_session() as session:
        alone = await probes_alone(session, target, n_probes)
        with Progress(
            TextColumn(f"  flood {target.name:<20}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("flood", total=n_flood)
            result = await flood_with_probes(
                session,
                target,
                n_flood,
                max_tokens,
                n_probes,
                slots,
                min_running,
                on_progress=lambda done, _total: progress.update(task, completed=done),
            )
    return {
        "target": target.name,
        "alone": summary_ms(alone),
        "flood": summary_ms(result.probe_ttfts_s),
        "batch_tokens": result.batch_tokens,
        "batch_elapsed_s": result.batch_elapsed_s,
        "batch_tokens_per_s": result.batch_tokens_per_s,
        "batch_failed": result.batch_failed,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(direct: dict[str, Any], guard: dict[str, Any], n_flood: int, max_tokens: int) -> dict:
    table = Table(
        title=f"Interactive TTFT with a flood of {n_flood} batch streams × {max_tokens} tokens"
    )
    for col in (
        "path",
        "TTFT p50 alone",
        "TTFT p95 alone",
        "TTFT p50 flood",
        "TTFT p95 flood",
        "p95 flood ÷ alone",
        "batch tokens/s",
    ):
        table.add_column(col, justify="right" if col != "path" else "left")
    for r in (direct, guard):
        table.add_row(
            r["target"],
            f"{r['alone']['p50_ms']:.0f} ms",
            f"{r['alone']['p95_ms']:.0f} ms",
            f"{r['flood']['p50_ms']:.0f} ms",
            f"{r['flood']['p95_ms']:.0f} ms",
            f"{_ratio(r['flood']['p95_ms'], r['alone']['p95_ms']):.1f}×",
            f"{r['batch_tokens_per_s']:.0f}",
        )
    console.print(table)
    isolation = _ratio(guard["flood"]["p95_ms"], guard["alone"]["p95_ms"])
    degradation = _ratio(direct["flood"]["p95_ms"], direct["alone"]["p95_ms"])
    conservation = _ratio(guard["batch_tokens_per_s"], direct["batch_tokens_per_s"])
    ok_iso = isolation <= ISOLATION_GOAL
    ok_cons = conservation >= CONSERVATION_GOAL
    console.print(
        f"Through the guard, interactive TTFT p95 under the flood is {isolation:.1f}× its p95 "
        f"alone (goal ≤ {ISOLATION_GOAL:g}×) {'[green]✓[/]' if ok_iso else '[red]✗[/]'}\n"
        f"Direct to vLLM it is {degradation:.1f}× (vLLM's priority policy cannot evict running "
        "batch sequences)\n"
        f"Batch throughput through the guard is {conservation:.0%} of direct (goal ≥ "
        f"{CONSERVATION_GOAL:.0%}) {'[green]✓[/]' if ok_cons else '[red]✗[/]'}"
    )
    return {
        "direct": direct,
        "guard": guard,
        "isolation_ratio": isolation,
        "direct_degradation": degradation,
        "work_conservation_ratio": conservation,
        "goals_met": ok_iso and ok_cons,
    }


async def _demo(args: argparse.Namespace) -> int:
    stack = Stack(args.port)
    console.print(
        f"[bold]vllm-guard demo[/]: tiny model on the CPU, logs in {stack.log_dir}\n"
        "Starting vLLM behind the guard (about a minute or two on 2 cores)..."
    )
    stack.start()
    try:
        started = time.monotonic()
        with console.status("waiting for vLLM to become healthy"):
            await stack.wait_ready()
        console.print(f"Stack ready in {time.monotonic() - started:.0f} s.")
        with console.status("warming up: the same flood once through each path, unmeasured"):
            await warm_up(stack, args.flood, args.max_tokens)
        direct_target, guard_target = targets(stack)
        results = []
        for target in (direct_target, guard_target):
            console.print(
                f"Measuring [bold]{target.name}[/]: {args.probes} probes alone, then "
                f"{args.flood} batch streams with probes alongside"
            )
            results.append(await measure(stack, target, args.flood, args.max_tokens, args.probes))
        summary = report(results[0], results[1], args.flood, args.max_tokens)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
            console.print(f"Wrote {args.json}")
        return 0
    finally:
        with console.status("stopping the stack"):
            stack.stop()


def run_demo(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except RuntimeError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
