"""What abusive connections cost the guard: an oversized request head, and many clients
that send half a head and stall (slowloris). Run on the current tree it shows the bounds of
vllm_guard/proxy/http_server.py at their defaults; run on a tree without them (`--tree DIR`, e.g.
a `git worktree` of an older commit) it measures the same load on that code.

    python benchmarks/request_limits.py [--tree .] [--out results/request_limits] [--label now]

The guard runs as `vllm-guard proxy` in front of guard_capacity.py's trivial upstream, with
a config that sets no `guard:` keys (so older trees accept it). While each load runs, a
probe sends `GET /health` every 10 ms and records its latency: the guard's event loop is
what an abusive connection would stall for everyone.

1. head: one request whose head carries one header of `--head-mib` MiB; the time until the
   guard answers or closes, the status it answered, and the probe's worst latency.
2. slowloris: `--slow` connections each send half a request head and then nothing; how many
   the guard still holds open after `--hold-s` seconds, and the probe latency meanwhile.

Writes request_limits_<label>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write_report

from vllm_guard.demo.workload import percentile
from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.stack import start_proxy, stop

HERE = Path(__file__).resolve().parent
CONFIG = """
classes:
  interactive: {vllm_priority: 0}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
"""


async def _probe(port: int, stop: asyncio.Event) -> list[float]:
    """/health latencies (ms) every 10 ms until `stop`."""
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
            await writer.drain()
            await reader.read()
            writer.close()
            latencies.append((time.perf_counter() - started) * 1000)
        except OSError:
            latencies.append(float("nan"))
        await asyncio.sleep(0.01)
    return latencies


def _summary(latencies: list[float]) -> dict[str, float]:
    ok = [x for x in latencies if x == x]
    return {
        "probes": len(latencies),
        "failed": len(latencies) - len(ok),
        "p50_ms": statistics.median(ok) if ok else float("nan"),
        "p99_ms": percentile(ok, 99) if ok else float("nan"),
        "max_ms": max(ok) if ok else float("nan"),
    }


def _send_head(port: int, mib: float) -> tuple[str, float]:
    """Blocking, in a thread, so the probe's loop is not the one that stalls."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\nx-big: "
        + b"a" * int(mib * 2**20)
        + b"\r\ncontent-length: 2\r\n\r\n{}"
    )
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(30)
        started = time.perf_counter()
        answer = b""
        try:
            sock.sendall(head)
            answer = sock.recv(200)
        except OSError:
            pass  # reset while sending: the guard refused and closed
        took_ms = (time.perf_counter() - started) * 1000
    return answer.split(b"\r\n")[0].decode("latin-1") or "(closed)", took_ms


async def _head(port: int, mib: float) -> dict[str, Any]:
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(port, stop))
    await asyncio.sleep(0.3)
    answer, took_ms = await asyncio.to_thread(_send_head, port, mib)
    await asyncio.sleep(0.3)
    stop.set()
    return {
        "head_mib": mib,
        "answer": answer,
        "answered_after_ms": took_ms,
        "health_probe": _summary(await probe),
    }


async def _slowloris(port: int, n: int, hold_s: float) -> dict[str, Any]:
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(port, stop))
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\nauthorization: Bea")
        s.setblocking(False)
        socks.append(s)
    await asyncio.sleep(hold_s)
    still_open = 0
    for s in socks:
        try:
            s.recv(65536)  # an answer (408) or b"": the guard closed it
        except BlockingIOError:
            still_open += 1  # nothing to read: the guard still holds the connection
        except OSError:
            pass  # reset by the guard
        s.close()
    stop.set()
    return {
        "connections": n,
        "held_s": hold_s,
        "still_open": still_open,
        "health_probe": _summary(await probe),
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    up_port, guard_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "guard_capacity.py"), "--serve-upstream", str(up_port)]
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CONFIG)
    tree = Path(args.tree).resolve()
    guard = start_proxy(
        f"http://127.0.0.1:{up_port}",
        Path(f.name),
        guard_port,
        {"CHAT_UI_KEY": "k", "PYTHONPATH": str(tree)},
        cwd=tree,
    )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", guard_port)).close()
                break
            except OSError:
                time.sleep(0.1)
        head = await _head(guard_port, args.head_mib)
        slow = await _slowloris(guard_port, args.slow, args.hold_s)
    finally:
        for p in (guard, upstream):
            stop(p, 10)
        os.unlink(f.name)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tree": str(tree),
        "label": args.label,
        "args": vars(args) | {"out": str(args.out)},
        "head": head,
        "slowloris": slow,
    }


def _markdown(r: dict[str, Any]) -> str:
    h, s = r["head"], r["slowloris"]
    hp, sp = h["health_probe"], s["health_probe"]
    return (
        f"# Request limits ({r['label']}, {r['when']})\n\n"
        f"| load | guard's answer | /health p50 | p99 | max |\n|---|---|---:|---:|---:|\n"
        f"| one {h['head_mib']:g} MiB header | {h['answer']} after "
        f"{h['answered_after_ms']:.0f} ms | {hp['p50_ms']:.1f} ms | {hp['p99_ms']:.1f} ms | "
        f"{hp['max_ms']:.1f} ms |\n"
        f"| {s['connections']} half heads, {s['held_s']:g} s | {s['still_open']} still open "
        f"| {sp['p50_ms']:.1f} ms | {sp['p99_ms']:.1f} ms | {sp['max_ms']:.1f} ms |\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=".", help="the vllm-guard tree to run (default: this one)")
    p.add_argument("--label", default="current")
    p.add_argument("--head-mib", type=float, default=8.0)
    p.add_argument("--slow", type=int, default=500, help="slowloris connections")
    p.add_argument("--hold-s", type=float, default=12.0, help="past header_timeout_s (10)")
    p.add_argument("--out", type=Path, default=Path("results/request_limits"))
    args = p.parse_args(argv)
    result = asyncio.run(_run(args))
    write_report(args.out, f"request_limits_{args.label}", result, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
