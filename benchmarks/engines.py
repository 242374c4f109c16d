"""Two engines behind one guard, and one of them stopped mid-run.

    python benchmarks/engines.py [--duration 60] [--batch 10] [--out results/engines]

Starts two tiny vLLMs (`vllm-guard serve --model tiny`, 8 slots each, one engine key; A
computes on core 0, B on core 1 — vLLM's CPU build binds every engine to core 0 unless
`VLLM_CPU_OMP_THREADS_BIND` says otherwise, and then one starves the other) and
`vllm-guard proxy --upstream A --upstream B` in front of both (default `hang_detect_s`, 5 s:
with 2 s, the two engines' API servers on 2 busy cores missed their health deadline now
and then and were taken out while well).
Load for `--duration` s: `--batch` clients sending non-streaming batch completions back to
back (64 tokens), and one interactive client sending streaming chat probes one after
another (TTFT = time to the first `data:` event). At a third of the run engine B's API
server is stopped (SIGSTOP: it accepts connections and answers nothing), at two thirds
it is continued (SIGCONT).

Reported: requests each engine served (vLLM's own `vllm:request_success_total`), before
the stop; the time from the stop until the guard's `vllm_guard_engine_up` for B reads 0
(sampled every 100 ms) and from the continue until it reads 1; requests that failed, by
class and phase (goal: none — a request B held without answering goes to A); requests
the guard sent to A after B never answered (`vllm_guard_engine_failovers_total`); and
interactive TTFT p50/p95/max per phase. Writes engines.json and engines.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from common import write_report

from vllm_guard.demo.workload import new_session, percentile
from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.testing.stack import Stack, start_proxy, stop, wait_healthy

KEYS = {"CHAT_UI_KEY": "bench-chat-key-8d1e", "ETL_KEY": "bench-etl-key-3f7a"}
SLOTS = 8

ENGINE_CONFIG = f"""
engine: {{max_num_seqs: {SLOTS}, scheduler: vllm}}
classes:
  interactive: {{vllm_priority: 0}}
tenants:
  chat-ui: {{class: interactive, api_keys: ["env:CHAT_UI_KEY"]}}
"""

PROXY_CONFIG = f"""
engine: {{max_num_seqs: {SLOTS}, scheduler: vllm}}
guard: {{engine_key: "env:VLLM_GUARD_ENGINE_KEY"}}
classes:
  interactive: {{vllm_priority: 0, reserved_seqs: 2, max_wait_s: 30}}
  batch: {{vllm_priority: 10, max_queue: 1000, max_wait_s: 120}}
tenants:
  chat-ui: {{class: interactive, api_keys: ["env:CHAT_UI_KEY"]}}
  nightly-etl: {{class: batch, api_keys: ["env:ETL_KEY"]}}
"""


async def _batch_client(
    session: aiohttp.ClientSession, url: str, stop_at: float, out: list[tuple[float, str]]
) -> None:
    headers = {"Authorization": f"Bearer {KEYS['ETL_KEY']}"}
    body = {"model": "tiny", "prompt": "batch work", "max_tokens": 64, "ignore_eos": True}
    while time.monotonic() < stop_at:
        sent = time.monotonic()
        try:
            async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                data = await r.json(content_type=None)
                ok = r.status == 200 and data["usage"]["completion_tokens"] == 64
                out.append((sent, "ok" if ok else f"http {r.status}"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            out.append((sent, type(exc).__name__))


async def _probes(
    session: aiohttp.ClientSession, url: str, stop_at: float, out: list[tuple[float, Any]]
) -> None:
    """(sent, ttft_s) per probe, or (sent, error)."""
    headers = {"Authorization": f"Bearer {KEYS['CHAT_UI_KEY']}"}
    i = 0
    while time.monotonic() < stop_at:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Probe {i}: say something short."}],
            "max_tokens": 16,
            "stream": True,
        }
        i += 1
        sent = time.monotonic()
        ttft = None
        try:
            async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                if r.status != 200:
                    out.append((sent, f"http {r.status}"))
                    await r.read()
                    continue
                ended = False
                async for line in r.content:
                    if ttft is None and line.startswith(b"data: {"):
                        ttft = time.monotonic() - sent
                    if line.startswith(b"data: [DONE]"):
                        ended = True
                out.append((sent, ttft if ended and ttft is not None else "cut"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            out.append((sent, type(exc).__name__))
        await asyncio.sleep(0.1)


async def _watch(
    url: str, labels: list[str], stop: asyncio.Event, seen: list[tuple[float, float, list[float]]]
) -> None:
    """Every 100 ms: (time, B's vllm_guard_engine_up, each engine's slots held)."""
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            async with s.get(url + "/metrics") as r:
                m = parse_prometheus(await r.text())
            held = [total(m, "vllm_guard_engine_in_flight", f"engine={x}") for x in labels]
            up = total(m, "vllm_guard_engine_up", f"engine={labels[1]}")
            seen.append((time.monotonic(), up, held))
            await asyncio.sleep(0.1)


async def _warm_up(stacks: list[Stack]) -> None:
    """A first wave of requests on each engine directly: vLLM's first batches are slow."""
    body = {"model": "tiny", "prompt": "warm up", "max_tokens": 16}
    async with aiohttp.ClientSession() as s:

        async def one(stack: Stack) -> None:
            async with s.post(
                stack.vllm_url + "/v1/completions", json=body, headers=stack.engine_headers
            ) as r:
                await r.read()

        for _ in range(3):
            await asyncio.gather(*(one(st) for st in stacks for _ in range(SLOTS)))


def two_engines(work: Path) -> tuple[Stack, Stack]:
    """Two tiny-vLLM stacks (not started) with one engine key: A computes on core 0
    (vLLM's default), B on core 1."""
    engine_config = work / "engine.yaml"
    engine_config.write_text(ENGINE_CONFIG)
    a = Stack(log_dir=work / "a", config_path=engine_config, keys=KEYS)
    b = Stack(
        log_dir=work / "b",
        config_path=engine_config,
        keys=KEYS,
        engine_key=a.engine_key,
        env={"VLLM_CPU_OMP_THREADS_BIND": "1"},
    )
    return a, b


def vllm_metrics(stack: Stack) -> dict[str, float]:
    """The engine's own /metrics, parsed (blocking: call it in a thread)."""
    req = urllib.request.Request(stack.vllm_url + "/metrics", headers=stack.engine_headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return parse_prometheus(resp.read().decode())


def _served(stack: Stack) -> float:
    return total(vllm_metrics(stack), "vllm:request_success_total")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="engines-"))
    a, b = two_engines(work)
    proxy_config = work / "proxy.yaml"
    proxy_config.write_text(PROXY_CONFIG)
    proc = None
    try:
        for s in (a, b):
            s.start()
        for s in (a, b):
            await s.wait_ready()
        await _warm_up([a, b])
        port, log = free_port(), work / "proxy.log"
        env = {**KEYS, "VLLM_GUARD_ENGINE_KEY": a.engine_key}
        proc = start_proxy(
            a.vllm_url, proxy_config, port, env, log, extra_args=("--upstream", b.vllm_url)
        )
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, 60, log)
        print("two engines and the proxy ready", flush=True)
        labels = [s.vllm_url.removeprefix("http://") for s in (a, b)]
        api_server, _ = b.vllm_pids()
        start = time.monotonic()
        stop_at = start + args.duration
        batch: list[tuple[float, str]] = []
        probes: list[tuple[float, Any]] = []
        seen: list[tuple[float, float, list[float]]] = []
        marks: dict[str, float] = {}
        watching = asyncio.Event()
        served_before: dict[str, float] = {}

        async def fault() -> None:
            await asyncio.sleep(args.duration / 3)
            served_before["a"], served_before["b"] = await asyncio.gather(
                asyncio.to_thread(_served, a), asyncio.to_thread(_served, b)
            )
            os.kill(api_server, signal.SIGSTOP)
            marks["stopped"] = time.monotonic()
            await asyncio.sleep(args.duration / 3)
            os.kill(api_server, signal.SIGCONT)
            marks["continued"] = time.monotonic()

        async with new_session() as session:
            watcher = asyncio.create_task(_watch(url, labels, watching, seen))
            await asyncio.gather(
                fault(),
                _probes(session, url, stop_at, probes),
                *(_batch_client(session, url, stop_at, batch) for _ in range(args.batch)),
            )
            await asyncio.sleep(3)
            watching.set()
            await watcher
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
            final = parse_prometheus(await r.text())
    finally:
        if proc is not None:
            stop(proc)
        for s in (a, b):
            s.stop()

    out_at = next((t for t, up, _ in seen if t > marks["stopped"] and up == 0), None)
    back_at = next((t for t, up, _ in seen if t > marks["continued"] and up == 1), None)
    before = [held for t, _, held in seen if t < marks["stopped"]]
    mean_held = [statistics.fmean(h[i] for h in before) for i in range(2)] if before else []
    phases = (
        ("before", start, marks["stopped"]),
        ("stopped", marks["stopped"], marks["continued"]),
        ("after", marks["continued"], float("inf")),
    )
    result_phases = {}
    for name, lo, hi in phases:
        ttfts = [v for t, v in probes if lo <= t < hi and isinstance(v, float)]
        result_phases[name] = {
            "batch_ok": sum(1 for t, v in batch if lo <= t < hi and v == "ok"),
            "batch_failed": [v for t, v in batch if lo <= t < hi and v != "ok"],
            "probes_ok": len(ttfts),
            "probes_failed": [v for t, v in probes if lo <= t < hi and not isinstance(v, float)],
            "ttft_p50_ms": percentile(ttfts, 50) * 1000,
            "ttft_p95_ms": percentile(ttfts, 95) * 1000,
            "ttft_max_ms": max(ttfts, default=float("nan")) * 1000,
        }
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "args": vars(args) | {"out": str(args.out)},
        "served_before_stop": served_before,
        "mean_slots_held_before_stop": mean_held,
        "stopped_at_s": marks["stopped"] - start,
        "continued_at_s": marks["continued"] - start,
        "out_of_rotation_after_s": None if out_at is None else out_at - marks["stopped"],
        "back_after_s": None if back_at is None else back_at - marks["continued"],
        "failovers": total(final, "vllm_guard_engine_failovers_total"),
        "phases": result_phases,
        "ttft_all_p50_ms": statistics.median(v for _, v in probes if isinstance(v, float)) * 1000,
    }


def _markdown(r: dict[str, Any]) -> str:
    sb = r["served_before_stop"]
    lines = [
        "# Two engines behind one guard, one stopped mid-run",
        "",
        f"{r['when']}, {r['cpus']} CPUs, two tiny vLLMs ({SLOTS} slots each, computing on "
        f"cores 0 and 1), `vllm-guard proxy` with two `--upstream`s, {r['args']['batch']} batch "
        "clients (non-streaming, 64 tokens) and one interactive client (streaming probes, "
        f"one after another) for {r['args']['duration']:.0f} s. Engine B's API server "
        f"SIGSTOPped at {r['stopped_at_s']:.0f} s, SIGCONTed at {r['continued_at_s']:.0f} s.",
        "",
        f"- Spread before the stop: engine A served {sb['a']:.0f} requests, B {sb['b']:.0f} "
        "(vLLM's `request_success_total`, warm-up included); slots the guard held on each, "
        "mean of 100 ms samples: A "
        f"{r['mean_slots_held_before_stop'][0]:.1f}, B {r['mean_slots_held_before_stop'][1]:.1f}.",
        f"- B out of rotation **{r['out_of_rotation_after_s']:.1f} s** after the stop "
        f"(`hang_detect_s` 5); back **{r['back_after_s']:.1f} s** after the continue.",
        f"- Requests B held without answering, sent to A instead: {r['failovers']:.0f}.",
        "",
        "| phase | batch ok | batch failed | probes ok | probes failed | TTFT p50 | p95 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in r["phases"].items():
        lines.append(
            f"| {name} | {p['batch_ok']} | {len(p['batch_failed'])} | {p['probes_ok']} | "
            f"{len(p['probes_failed'])} | {p['ttft_p50_ms']:.0f} ms | {p['ttft_p95_ms']:.0f} ms "
            f"| {p['ttft_max_ms']:.0f} ms |"
        )
    failed = [f for p in r["phases"].values() for f in p["batch_failed"] + p["probes_failed"]]
    lines += ["", f"Failures: {', '.join(map(str, failed)) or 'none'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=60, help="s of load (default 60)")
    p.add_argument("--batch", type=int, default=10, help="batch clients (default 10)")
    p.add_argument("--out", type=Path, default=Path("results/engines"))
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, "engines", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
