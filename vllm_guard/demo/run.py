"""`vllm-guard demo`: the whole product on a CPU, and what it changes, in a few minutes.

Starts two stacks from the embedded limits (16 engine slots): `vllm-guard serve --model
tiny` with vLLM's own scheduler (2 slots reserved for interactive) and with the guard's
scheduler plugin (nothing reserved: vLLM preempts batch for interactive requests), then
runs the isolation workload on three paths: straight to vLLM's private port (vLLM's
priority policy alone), through the guard with reserved slots, through the guard with the
plugin. Prints interactive TTFT alone and under a batch flood, and batch tokens/s, for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
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
from vllm_guard.testing.stack import Stack, config_text, with_scheduler

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


def report(results: list[dict[str, Any]], n_flood: int, max_tokens: int) -> dict:
    """The table, and each guarded path against the goals; `results[0]` is vLLM alone."""
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
    for r in results:
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
    direct, guarded = results[0], results[1:]
    degradation = _ratio(direct["flood"]["p95_ms"], direct["alone"]["p95_ms"])
    console.print(
        f"Direct to vLLM, interactive TTFT p95 under the flood is {degradation:.1f}× its p95 "
        "alone (vLLM's priority policy never preempts running batch sequences for it)"
    )
    summary: dict[str, Any] = {"direct": direct, "direct_degradation": degradation, "paths": []}
    for r in guarded:
        isolation = _ratio(r["flood"]["p95_ms"], r["alone"]["p95_ms"])
        conservation = _ratio(r["batch_tokens_per_s"], direct["batch_tokens_per_s"])
        ok_iso, ok_cons = isolation <= ISOLATION_GOAL, conservation >= CONSERVATION_GOAL
        console.print(
            f"[bold]{r['target']}[/]: TTFT p95 under the flood {isolation:.1f}× alone (goal ≤ "
            f"{ISOLATION_GOAL:g}×) {'[green]✓[/]' if ok_iso else '[red]✗[/]'}; batch "
            f"throughput {conservation:.0%} of direct (goal ≥ {CONSERVATION_GOAL:.0%}) "
            f"{'[green]✓[/]' if ok_cons else '[red]✗[/]'}"
        )
        summary["paths"].append(
            r
            | {
                "isolation_ratio": isolation,
                "work_conservation_ratio": conservation,
                "goals_met": ok_iso and ok_cons,
            }
        )
    return summary


async def _demo(args: argparse.Namespace) -> int:
    text = config_text()
    reserved = Stack(args.port, config_path=_write(text, "vllm"))
    plugin = Stack(config_path=_write(text, "guard"), log_dir=reserved.log_dir / "plugin")
    console.print(
        f"[bold]vllm-guard demo[/]: tiny model on the CPU, logs in {reserved.log_dir}\n"
        "Starting two stacks, vLLM behind the guard with reserved slots and with the "
        "scheduler plugin (about two minutes on 2 cores)..."
    )
    try:
        started = time.monotonic()
        with console.status("waiting for vLLM to become healthy"):
            for stack in (reserved, plugin):
                stack.start()
            await asyncio.gather(reserved.wait_ready(), plugin.wait_ready())
        console.print(f"Stacks ready in {time.monotonic() - started:.0f} s.")
        with console.status("warming up: the same flood once through each path, unmeasured"):
            await warm_up(reserved, args.flood, args.max_tokens)
            await warm_up(plugin, args.flood, args.max_tokens)
        direct_target, reserved_target = targets(reserved)
        plugin_target = replace(targets(plugin)[1], name="guard + scheduler plugin")
        reserved_target = replace(reserved_target, name="guard, reserved slots")
        results = []
        for stack, target in (
            (reserved, direct_target),
            (reserved, reserved_target),
            (plugin, plugin_target),
        ):
            console.print(
                f"Measuring [bold]{target.name}[/]: {args.probes} probes alone, then "
                f"{args.flood} batch streams with probes alongside"
            )
            results.append(await measure(stack, target, args.flood, args.max_tokens, args.probes))
        summary = report(results, args.flood, args.max_tokens)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
            console.print(f"Wrote {args.json}")
        return 0
    finally:
        with console.status("stopping the stacks"):
            for stack in (reserved, plugin):
                stack.stop()
                if stack.config_path is not None:
                    stack.config_path.unlink(missing_ok=True)


def _write(text: str, scheduler: str) -> Path:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(with_scheduler(text, scheduler))
    return Path(f.name)


def run_demo(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except RuntimeError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
