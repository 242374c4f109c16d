"""The pure part of `vllm-guard tune`: the knee, the recommendation, the files it writes.

Kept apart from tune.py, which imports Locust (and with it gevent's patching of the
standard library), so these can be tested in an ordinary process.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import yaml

from vllm_guard.config import load_config

KNEE_GAIN = 0.05
"""A step adding less batch throughput than this (relative) is past the knee."""


def knee_reached(steps: list[dict[str, Any]], objective_ms: float) -> bool:
    last = steps[-1]
    if last["ttft_p95_ms"] is None or last["ttft_p95_ms"] > objective_ms:
        return True
    best_before = max((s["batch_tokens_per_s"] for s in steps[:-1]), default=0.0)
    return bool(steps[:-1]) and last["batch_tokens_per_s"] < best_before * (1 + KNEE_GAIN)


def recommend(
    steps: list[dict[str, Any]], objective_ms: float, reserved_now: int, slots: int
) -> dict[str, Any] | None:
    meeting = [
        s for s in steps if s["ttft_p95_ms"] is not None and s["ttft_p95_ms"] <= objective_ms
    ]
    if not meeting:
        return None
    best = max(meeting, key=lambda s: s["batch_tokens_per_s"])
    reserved = max(reserved_now, math.ceil(best["interactive_in_flight_max"]) + 1)
    return {
        "step": best,
        "max_concurrent": best["batch_users"],
        "tokens_per_minute": math.ceil(best["batch_tokens_per_s"] * 60 * 1.2 / 100) * 100,
        "reserved_seqs": min(reserved, slots - 1),
    }


def write_limits(
    config_path: Path, out: Path, rec: dict[str, Any], batch_tenant: str, interactive: str
) -> Path:
    raw = yaml.safe_load(config_path.read_text())
    raw["classes"][interactive]["reserved_seqs"] = rec["reserved_seqs"]
    tenant = raw["tenants"][batch_tenant]
    limits = dict(tenant.get("limits") or {})
    limits["max_concurrent"] = rec["max_concurrent"]
    limits["tokens_per_minute"] = rec["tokens_per_minute"]
    tenant["limits"] = limits
    header = (
        f"# Written by vllm-guard tune on {time.strftime('%Y-%m-%d %H:%M')} from {config_path}:\n"
        f"# best batch load meeting the TTFT objective was {rec['max_concurrent']} batch users "
        f"({rec['step']['batch_tokens_per_s']:.0f} tokens/s, TTFT p95 "
        f"{rec['step']['ttft_p95_ms']:.0f} ms).\n"
    )
    path = out / "limits.yaml"
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    load_config(path)  # it must load (keys come from the same environment)
    return path


def plots(steps: list[dict[str, Any]], objective_ms: float, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["batch_users"] for s in steps]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(xs, [s["ttft_p95_ms"] or math.nan for s in steps], marker="o", label="TTFT p95")
    a.plot(xs, [s["ttft_p50_ms"] or math.nan for s in steps], marker=".", label="TTFT p50")
    a.axhline(objective_ms, color="red", linestyle="--", label="objective")
    a.set_ylabel("interactive TTFT (ms)")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(xs, [s["batch_tokens_per_s"] for s in steps], marker="o", color="green")
    b.set_ylabel("batch output tokens/s")
    b.set_xlabel("batch users (one request in flight each)")
    b.grid(alpha=0.3)
    fig.suptitle("vllm-guard tune: interactive TTFT and batch throughput vs batch load")
    fig.tight_layout()
    fig.savefig(out / "tune.png", dpi=110)
    plt.close(fig)
    return ["tune.png"]


def report(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        "# vllm-guard tune",
        "",
        f"{result['when']}: {a['url']}, config {a['config']}, {a['interactive_users']} "
        f"interactive users (think time {a['interactive_wait']} s), batch steps "
        f"{a['batch_steps']}, {a['step_s']} s per step after {a['warmup_s']} s warm-up, "
        f"objective TTFT p95 ≤ {a['objective_ms']:g} ms.",
        "",
        "| batch users | TTFT p50 | TTFT p95 | batch tokens/s | max queue | "
        "interactive in flight (max) | KV reserved (max) |",
        "|---:|---:|---:|---:|---|---:|---:|",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['batch_users']} | {s['ttft_p50_ms'] or 0:.0f} ms | "
            f"{s['ttft_p95_ms'] or 0:.0f} ms | {s['batch_tokens_per_s']:.0f} | "
            f"{s['queue_depth_max']} | {s['interactive_in_flight_max']:.0f} | "
            f"{s['kv_reserved_max']:.0f} |"
        )
    rec = result.get("recommendation")
    lines.append("")
    if rec is None:
        lines.append(
            "No step met the objective: nothing recommended (lower the interactive load?)."
        )
    else:
        lines += [
            f"Recommended (written to `limits.yaml`): tenant `{result['batch_tenant']}` "
            f"max_concurrent **{rec['max_concurrent']}**, tokens_per_minute "
            f"**{rec['tokens_per_minute']}**; class `{result['interactive']}` reserved_seqs "
            f"**{rec['reserved_seqs']}**.",
        ]
    lines += ["", "![TTFT and throughput vs batch load](tune.png)", ""]
    return "\n".join(lines)
