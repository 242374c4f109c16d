"""The pure part of `vllm-guard tune`: the knee, the recommendation, the files it writes.

Kept apart from tune.py, which imports Locust (and with it gevent's patching of the
standard library), so these can be tested in an ordinary process.
"""

from __future__ import annotations

import copy
import math
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


Change = tuple[tuple[str, ...], Any, str]
"""A key path in the limits file, its tuned value, and the comment saying why."""


def plan(
    raw: dict[str, Any], rec: dict[str, Any], objective_ms: float, plugin: bool
) -> list[Change]:
    """What `tune` changes in the whole config (`raw`, the file as loaded), from the sweep's
    recommendation: every tenant of a less urgent class its share, by `weight`, of the batch
    concurrency and tokens/min measured at the best step; the most urgent class's
    `reserved_seqs` (not with the scheduler plugin, which reserves nothing: it preempts
    batch work for the urgent class); and each class's `max_queue` from the measured drain
    rate (what drains within its `max_wait_s`: a request queued further back would time
    out anyway)."""
    step = rec["step"]
    classes = sorted(raw["classes"], key=lambda c: raw["classes"][c]["vllm_priority"])
    urgent = classes[0]
    p95 = step["ttft_p95_ms"]
    at = (
        f"at {rec['max_concurrent']} batch requests in flight, the most that kept interactive "
        f"TTFT p95 ({p95:.0f} ms) within {objective_ms:g} ms"
    )
    changes: list[Change] = []
    if not plugin:
        changes.append(
            (
                ("classes", urgent, "reserved_seqs"),
                rec["reserved_seqs"],
                f"peak {step['interactive_in_flight_max']:.0f} {urgent} requests in flight "
                f"{at}, plus one",
            )
        )
    batch = {n: t for n, t in raw["tenants"].items() if t["class"] != urgent}
    weights = {n: float(t.get("weight", 1.0)) for n, t in batch.items()}
    total_weight = sum(weights.values())
    tokens_per_minute = step["batch_tokens_per_s"] * 60
    for name, weight in weights.items():
        share = weight / total_weight
        part = f"{share:.0%} (weight {weight:g} of {total_weight:g})"
        concurrent = max(1, round(rec["max_concurrent"] * share))
        tpm = max(100, math.ceil(tokens_per_minute * 1.2 * share / 100) * 100)
        limits = ("tenants", name, "limits")
        changes += [
            ((*limits, "max_concurrent"), concurrent, f"{part} of {rec['max_concurrent']}, {at}"),
            (
                (*limits, "tokens_per_minute"),
                tpm,
                f"{part} of 1.2 x the {tokens_per_minute:.0f} batch tokens/min measured there",
            ),
        ]
    # The batch users saturate the engine, so their completion rate is what the less urgent
    # classes drain; the interactive load is held fixed, so its drain capacity is not
    # measured and its queue is left as it is.
    drained = step.get("batch_requests_per_s") or 0.0
    if drained:
        for name in classes[1:]:
            wait_s = float(raw["classes"][name].get("max_wait_s", 30.0))
            why = f"{drained:.2f} batch requests/s drained {at}, x max_wait_s {wait_s:g}"
            changes.append(
                (("classes", name, "max_queue"), max(1, math.ceil(drained * wait_s)), why)
            )
    return changes


def apply(raw: dict[str, Any], changes: list[Change]) -> dict[str, Any]:
    """`raw` with `changes` made (a tenant limited only by its class's `default_limits`
    gets those as its own, plus the tuned ones)."""
    out = copy.deepcopy(raw)
    for path, value, _ in changes:
        node = out
        for i, key in enumerate(path[:-1]):
            if key not in node or node[key] is None:
                node[key] = {}
                if key == "limits" and path[0] == "tenants":
                    cls = out["classes"][node["class"]]
                    node[key] = dict(cls.get("default_limits") or {})
            node = node[key]
            assert isinstance(node, dict), path[: i + 1]
        node[path[-1]] = value
    return out


def write_config(config_path: Path, out: Path, changes: list[Change], header: str) -> Path:
    """The tuned copy of `config_path` as `out/limits.yaml`: block style, each changed key
    with a comment saying what was measured. It must load (the keys it references come from
    this process's environment)."""
    raw = yaml.safe_load(config_path.read_text())
    comments = {path: why for path, _, why in changes}
    lines = [f"# {line}" for line in header.splitlines()]
    lines += _emit(apply(raw, changes), comments, ())
    path = out / "limits.yaml"
    path.write_text("\n".join(lines) + "\n")
    load_config(path)
    return path


def _emit(
    node: dict[str, Any], comments: dict[tuple[str, ...], str], at: tuple[str, ...]
) -> list[str]:
    pad = "  " * len(at)
    lines = []
    for key, value in node.items():
        path = (*at, str(key))
        note = f"  # tuned: {comments[path]}" if path in comments else ""
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{_flow(key)}:")
            lines += _emit(value, comments, path)
        else:
            lines.append(f"{pad}{_flow(key)}: {_flow(value)}{note}")
    return lines


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


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
        plugin = " (the scheduler plugin runs: no slots reserved)" if result.get("plugin") else ""
        lines += [
            f"Best step: {rec['max_concurrent']} batch users{plugin}. Changed in `limits.yaml` "
            "(each line there says the same):",
            "",
            "| key | tuned | from |",
            "|---|---:|---|",
        ]
        lines += [
            f"| `{'.'.join(path)}` | {value} | {why} |"
            for path, value, why in result.get("changes", [])
        ]
    lines += ["", "![TTFT and throughput vs batch load](tune.png)", ""]
    return "\n".join(lines)
