"""`vllm-guard tune`: a capacity sweep with Locust that writes a limits.yaml.

Holds a fixed interactive load (`--interactive-users`) and ramps batch users step by step
(`--batch-steps`, each `--step-s` long after a short warm-up). At each step it records
interactive TTFT p50/p95 (Locust's `TTFT` entry: until the first streamed event), batch
output tokens/s, and from the guard's /metrics the queue depth per class, interactive
requests in flight and KV reserved vs capacity. It stops at the knee: the first step over
the TTFT objective, or one that adds less than 5 % batch throughput.

The recommendation is the step with the most batch tokens/s whose TTFT p95 met the
objective, applied to the whole config (`recommend.plan`): every tenant of a less urgent
class gets its share by `weight` of that step's batch users as `max_concurrent` (each user
keeps one request in flight) and of 1.2 x the tokens/min measured there as
`tokens_per_minute` (a ceiling, not the binding limit); the most urgent class's
`reserved_seqs` = at least the peak of its requests in flight + 1 (not with the scheduler
plugin, which reserves nothing); each less urgent class's `max_queue` = what the measured
batch drain rate clears within its `max_wait_s`. They are written into a copy of `--config` as
`limits.yaml`, a comment on each changed line saying what was measured, with `report.md`
and PNG plots.

`--measure N` runs one step at N batch users instead (same load, same numbers): apply the
tuned limits.yaml, restart the stack and re-measure to check the objective holds.

Locust runs as a library in this process (gevent): this module patches the standard
library on import, so nothing asyncio-based may run here.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402
from locust.env import Environment  # noqa: E402

from vllm_guard.config import load_config  # noqa: E402
from vllm_guard.loadtest import preflight  # noqa: E402
from vllm_guard.loadtest.recommend import (  # noqa: E402
    knee_reached,
    plan,
    plots,
    recommend,
    report,
    write_config,
)
from vllm_guard.loadtest.users import TTFT, BatchUser, InteractiveUser, counters  # noqa: E402


def _options(args: argparse.Namespace) -> argparse.Namespace:
    """What the Locust users read from Locust's own command line."""
    return argparse.Namespace(
        interactive_key=args.interactive_key,
        batch_key=args.batch_key,
        model=args.model,
        direct=False,
        interactive_max_tokens=16,
        batch_max_tokens=args.batch_max_tokens,
        interactive_wait=args.interactive_wait,
        batch_wait="0,0",
        interactive_weight=1,
        batch_weight=1,
        interactive_users=args.interactive_users,
    )


def _metrics_text(metrics_url: str) -> str:
    """The guard's /metrics ('' when it does not answer)."""
    try:
        return requests.get(metrics_url + "/metrics", timeout=5).text
    except requests.RequestException:
        return ""


def _guard_sample(metrics_url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    text = _metrics_text(metrics_url)
    for m in re.finditer(r"^(vllm_guard_[a-z_]+)(\{[^}]*\})? (\S+)$", text, re.M):
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        key = name + labels
        if name in ("vllm_guard_queue_depth", "vllm_guard_in_flight"):
            out[key] = value
        elif name in ("vllm_guard_kv_reserved_tokens", "vllm_guard_kv_capacity_tokens"):
            out[name] = value
    return out


def run_step(
    env: Environment, args: argparse.Namespace, batch_users: int, log: Any
) -> dict[str, Any]:
    """One load level: start it, warm up, measure for step_s; returns the numbers."""
    runner = env.runner
    assert runner is not None
    total = args.interactive_users + batch_users
    runner.start(total, spawn_rate=max(50, total))
    gevent.sleep(args.warmup_s)
    env.stats.reset_all()
    counters["batch_tokens"] = counters["batch_requests"] = 0
    samples: list[dict[str, float]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.step_s:
        samples.append(_guard_sample(args.metrics_url))
        gevent.sleep(1.0)
        if len(samples) % 10 == 0:  # progress within the step
            ttft_so_far = env.stats.get("interactive", TTFT)
            p95_so_far = (
                ttft_so_far.get_response_time_percentile(0.95) if ttft_so_far.num_requests else 0
            )
            log(
                f"    {time.monotonic() - t0:.0f}/{args.step_s:.0f} s at {batch_users} batch "
                f"users: TTFT p95 so far {p95_so_far or 0:.0f} ms"
            )
    elapsed = time.monotonic() - t0
    ttft = env.stats.get("interactive", TTFT)
    chat = env.stats.get("interactive chat (total)", "POST")
    batch = env.stats.get("batch completion", "POST")

    def peak(key: str) -> float:
        return max((s.get(key, 0.0) for s in samples), default=0.0)

    step = {
        "batch_users": batch_users,
        "interactive_users": args.interactive_users,
        "ttft_n": ttft.num_requests,
        "ttft_p50_ms": ttft.get_response_time_percentile(0.5) if ttft.num_requests else None,
        "ttft_p95_ms": ttft.get_response_time_percentile(0.95) if ttft.num_requests else None,
        "interactive_failures": chat.num_failures,
        "batch_requests": counters["batch_requests"],
        "batch_failures": batch.num_failures,
        "batch_tokens_per_s": counters["batch_tokens"] / elapsed,
        "batch_requests_per_s": counters["batch_requests"] / elapsed,
        "queue_depth_max": {
            c: peak(f'vllm_guard_queue_depth{{class="{c}"}}') for c in args.class_names
        },
        "interactive_in_flight_max": peak(f'vllm_guard_in_flight{{class="{args.interactive}"}}'),
        "kv_reserved_max": peak("vllm_guard_kv_reserved_tokens"),
        "kv_capacity": peak("vllm_guard_kv_capacity_tokens"),
    }
    p95 = step["ttft_p95_ms"]
    log(
        f"  batch users {batch_users:>3}: TTFT p50/p95 {step['ttft_p50_ms'] or 0:.0f}/"
        f"{p95 or 0:.0f} ms (n={ttft.num_requests}), batch {step['batch_tokens_per_s']:.0f} "
        f"tokens/s, max queue {step['queue_depth_max']}"
    )
    return step


def _runs_plugin(metrics_url: str) -> bool:
    """Whether the stack runs the scheduler plugin (its series are on the guard's /metrics)."""
    return "vllm_guard_scheduler_" in _metrics_text(metrics_url)


def _tenant_of(key: str, config_path: Path) -> str:
    config = load_config(config_path)
    tenant = config.key_digests.get(hashlib.sha256(key.encode()).digest())
    if tenant is None:
        raise SystemExit(
            f"vllm-guard tune: the batch key is not a key of any tenant in {config_path}"
        )
    return tenant.name


def main_tune(args: argparse.Namespace) -> int:
    out: Path = args.out
    config = load_config(args.config)
    keys = [("--interactive-key", args.interactive_key), ("--batch-key", args.batch_key)]
    problem = preflight.problem(args.url, config, args.config, keys)
    if problem is not None:  # before any load
        print(f"vllm-guard tune: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.metrics_url is None:  # the guard's metrics port, where it has one
        port = config.guard.metrics_port
        args.metrics_url = re.sub(r":\d+$", f":{port}", args.url.rstrip("/")) if port else args.url
    plugin = _runs_plugin(args.metrics_url)
    args.interactive = config.classes[0].name
    args.class_names = [c.name for c in config.classes]
    InteractiveUser.configure(_options(args))
    BatchUser.configure(_options(args))
    env = Environment(user_classes=[InteractiveUser, BatchUser], host=args.url)
    env.create_local_runner()

    def log(text: str) -> None:
        print(text, flush=True)

    steps: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        if args.measure is not None:
            log(f"measuring {args.interactive_users} interactive + {args.measure} batch users")
            steps.append(run_step(env, args, args.measure, log))
        else:
            batch_steps = [int(x) for x in args.batch_steps.split(",")]
            per_step = args.step_s + args.warmup_s
            log(
                f"sweep: {len(batch_steps)} steps at most, {per_step:.0f} s each "
                f"(≤ {len(batch_steps) * per_step / 60:.1f} min); stops at the knee"
            )
            for i, b in enumerate(batch_steps, start=1):
                log(f"step {i}/{len(batch_steps)} ({time.monotonic() - started:.0f} s so far)")
                steps.append(run_step(env, args, b, log))
                if knee_reached(steps, args.objective_ms):
                    log("  knee reached: stopping")
                    break
    finally:
        assert env.runner is not None
        env.runner.quit()

    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "interactive": args.interactive,
        "steps": steps,
    }
    if args.measure is not None:
        s = steps[0]
        met = s["ttft_p95_ms"] is not None and s["ttft_p95_ms"] <= args.objective_ms
        result["objective_met"] = met
        (out / "measure.json").write_text(json.dumps(result, indent=2) + "\n")
        log(f"TTFT p95 {s['ttft_p95_ms']} ms: objective {'met' if met else 'NOT met'}")
        return 0 if met else 1

    result["batch_tenant"] = _tenant_of(args.batch_key, args.config)
    result["plugin"] = plugin
    raw = yaml.safe_load(args.config.read_text())
    reserved_now = dict(raw["classes"][args.interactive]).get("reserved_seqs", 0)
    rec = recommend(steps, args.objective_ms, reserved_now, config.max_num_seqs)
    result["recommendation"] = rec
    plots(steps, args.objective_ms, out)
    if rec is not None:
        changes = plan(raw, rec, args.objective_ms, plugin)
        result["changes"] = changes
        header = (
            f"Written by vllm-guard tune on {time.strftime('%Y-%m-%d %H:%M')} from "
            f"{args.config}, against {args.url}\n({args.interactive_users} interactive users, "
            f"batch steps {args.batch_steps}, {args.step_s:g} s each; the best step meeting "
            f"TTFT p95 <= {args.objective_ms:g} ms was {rec['max_concurrent']} batch users:\n"
            f"{rec['step']['batch_tokens_per_s']:.0f} batch tokens/s, TTFT p95 "
            f"{rec['step']['ttft_p95_ms']:.0f} ms). Lines marked 'tuned' changed; see report.md."
        )
        path = write_config(args.config, out, changes, header)
        log(f"wrote {path} ({len(changes)} keys tuned)")
    (out / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report(result))
    log(f"wrote {out / 'report.md'}, tune.json, tune.png")
    return 0 if rec is not None else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
