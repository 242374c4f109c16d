"""`vllm-guard demo`: the whole product on a CPU, and what it changes, in a few minutes.

Starts `vllm-guard serve --model tiny` (the embedded limits: 16 engine slots, 2 reserved
for interactive), then runs the isolation workload twice: straight to vLLM's private port
(vLLM's priority policy alone) and through the guard. Prints interactive TTFT alone and
under a batch flood, and batch tokens/s, for both paths.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vllm_guard.config import load_config
from vllm_guard.launcher import free_port
from vllm_guard.workload import (
    Target,
    flood_with_probes,
    new_session,
    probes_alone,
    summary_ms,
)

console = Console()

ISOLATION_GOAL = 3.0  # guard: flood p95 within 3x of alone p95 (issue #2)
CONSERVATION_GOAL = 0.85  # guard batch tokens/s at least 85% of direct


class Stack:
    """`vllm-guard serve --model tiny` as a child process, with keys made up for the run."""

    def __init__(
        self,
        port: int = 0,
        log_dir: Path | None = None,
        config_path: Path | None = None,
        key_vars: tuple[str, ...] = ("CHAT_UI_KEY", "ETL_KEY"),
        vllm_args: tuple[str, ...] = (),
        keys: Mapping[str, str] | None = None,
    ) -> None:
        """`keys`: use these (variable -> key) instead of making up one per `key_vars`,
        e.g. for a second stack that must accept the first one's clients."""
        self.port = port or free_port()
        self.vllm_port = free_port()
        self.keys = dict(keys) if keys else {var: secrets.token_urlsafe(24) for var in key_vars}
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="vllm-guard-demo-"))
        self.vllm_log = self.log_dir / "vllm.log"
        self.guard_log = self.log_dir / "guard.log"
        self.proc: subprocess.Popen[bytes] | None = None
        env = {**os.environ, **self.keys}
        self.config_path = config_path
        self.vllm_args = vllm_args
        self.config = load_config(config_path, env)
        self._env = env

    @property
    def guard_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def vllm_url(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "vllm_guard", "serve", "--model", "tiny",
            "--port", str(self.port), "--vllm-port", str(self.vllm_port),
            "--vllm-log", str(self.vllm_log),
        ]  # fmt: skip
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        if self.vllm_args:
            cmd += ["--", *self.vllm_args]
        with open(self.guard_log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=self._env, stdout=out, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout_s: float = 600) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vllm-guard serve exited: see {self.guard_log}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with s.get(self.guard_url + "/health") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.5)
        raise RuntimeError(f"stack not ready after {timeout_s:.0f} s; see {self.vllm_log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    async def warm_up(self, n_flood: int, max_tokens: int) -> None:
        """Run the workload once through each path, unmeasured. A fresh vLLM CPU engine
        stalls now and then (seen: 0.3-3.7 s before a new request's first token, on both
        paths) and mostly stops once the same workload has run; new batch shapes are the
        likely cause, and the guard's waves of admissions make other mixes of prefills and
        decodes than a flood sent straight to vLLM. A long-running server is warm, so both
        paths are measured warm."""
        slots = self.config.max_num_seqs
        async with new_session() as session:
            for target in self.targets():
                await probes_alone(session, target, 10)
                await flood_with_probes(session, target, n_flood, max_tokens, 0, slots, 1)

    def batch_running_at_saturation(self, target: Target) -> int:
        """Batch streams that run at once when the flood saturates `target`: every engine
        slot straight to vLLM, the batch class's slot limit through the guard."""
        if target.base_url == self.vllm_url:
            return self.config.max_num_seqs
        return self.config.classes_by_name["batch"].slot_limit

    def targets(self) -> tuple[Target, Target]:
        inter, batch = (
            self.config.classes_by_name["interactive"],
            self.config.classes_by_name["batch"],
        )
        direct = Target(
            "direct to vLLM",
            self.vllm_url,
            {},
            {},
            {"priority": inter.vllm_priority},
            {"priority": batch.vllm_priority},
        )
        guard = Target(
            "through vllm-guard",
            self.guard_url,
            {"Authorization": f"Bearer {self.keys['CHAT_UI_KEY']}"},
            {"Authorization": f"Bearer {self.keys['ETL_KEY']}"},
        )
        return direct, guard


@contextlib.asynccontextmanager
async def running_stack(config_text: str, **kw: Any) -> AsyncIterator[Stack]:
    """A ready `vllm-guard serve --model tiny` with `config_text` as its limits file
    (keyword arguments go to `Stack`); stopped, and the file removed, on the way out."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_text)
    try:
        stack = Stack(config_path=Path(f.name), **kw)
        stack.start()
        try:
            await stack.wait_ready()
            yield stack
        finally:
            stack.stop()
    finally:
        os.unlink(f.name)


async def measure(
    stack: Stack, target: Target, n_flood: int, max_tokens: int, n_probes: int
) -> dict[str, Any]:
    slots = stack.config.max_num_seqs
    min_running = stack.batch_running_at_saturation(target)
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
            await stack.warm_up(args.flood, args.max_tokens)
        direct_target, guard_target = stack.targets()
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
