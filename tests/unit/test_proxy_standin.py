"""`vllm-guard proxy` as a process, in front of a stand-in engine (tests/unit/fake_upstream.py
run as a program): what happens on real sockets between clients, the guard and an engine."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import KEYS
from vllm_guard.launcher import free_port

CONFIG = """
engine: {max_num_seqs: 128, queue_ahead: 0, kv_admission: false}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 1, max_queue: 100}
  batch: {vllm_priority: 10, max_queue: 100}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"]}
"""


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


@pytest.fixture
def guarded(tmp_path) -> Iterator[tuple[int, Path]]:
    """A stand-in engine in streaming mode "big", `vllm-guard proxy` before it: the guard's
    port and the processes' log."""
    engine_port, guard_port = free_port(), free_port()
    config = tmp_path / "limits.yaml"
    config.write_text(CONFIG)
    log = tmp_path / "processes.log"
    procs: list[subprocess.Popen[bytes]] = []
    with open(log, "wb") as out:
        engine = [
            sys.executable, "-m", "tests.unit.fake_upstream", "--port", str(engine_port),
            "--mode", "big",
        ]  # fmt: skip
        procs.append(subprocess.Popen(engine, stdout=out, stderr=out))
        guard = [
            sys.executable, "-m", "vllm_guard", "proxy", "--config", str(config),
            "--upstream", f"http://127.0.0.1:{engine_port}", "--port", str(guard_port),
        ]  # fmt: skip
        procs.append(subprocess.Popen(guard, env={**os.environ, **KEYS}, stdout=out, stderr=out))
    try:
        _wait_http(f"http://127.0.0.1:{engine_port}/health", procs[0], log)
        _wait_http(f"http://127.0.0.1:{guard_port}/health", procs[1], log)
        yield guard_port, log
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _stalled_stream(port: int, size: int) -> socket.socket:
    """Tenant A asks for a stream of `size` bytes and reads none of it."""
    body = b'{"model": "tiny", "prompt": "a", "stream": true, "big_body_bytes": %d}' % size
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: guard\r\nauthorization: Bearer chat-secret\r\n"
        b"x-request-id: tenant-a\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def test_clients_that_stop_reading_and_reset_leak_nothing_to_the_next_tenant(guarded):
    """Whether the guard still holds unread pieces of an answer the engine finished when its
    client resets depends on how much the kernel's socket buffers absorbed, which differs
    between machines: so many sizes at once, 128 KiB apart (half the client's high-water
    mark), up to 8 MiB. Then tenant B sends as many requests at once, one on each pooled
    connection the guard may hold, and each must get B's own answer."""
    port, log = guarded
    sizes = range(128 * 1024, 8 * 2**20 + 1, 128 * 1024)
    socks = [_stalled_stream(port, size) for size in sizes]
    time.sleep(1.5)  # the engine streams everything; these clients read nothing
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # linger 0: a reset

    async def tenant_b() -> list[httpx.Response | BaseException]:
        headers = {"authorization": "Bearer etl-secret", "x-request-id": "tenant-b"}
        limits = httpx.Limits(max_connections=len(socks))
        async with httpx.AsyncClient(timeout=10, limits=limits) as client:
            url = f"http://127.0.0.1:{port}/v1/completions"
            return await asyncio.gather(
                *(client.post(url, headers=headers, json={"prompt": "b"}) for _ in socks),
                return_exceptions=True,
            )

    answers = asyncio.run(tenant_b())
    hung = sum(isinstance(a, httpx.TimeoutException) for a in answers)
    leaked = sum(isinstance(a, httpx.Response) and b"tenant-a" in a.content for a in answers)
    assert (hung, leaked) == (0, 0), (
        f"{len(answers)} requests: {hung} hung, {leaked} got A's",
        log.read_text()[-2000:],
    )
    for r in answers:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        assert r.json()["usage"]["total_tokens"] > 0
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'vllm_guard_in_flight{class="interactive"} 0.0' in metrics
    assert 'vllm_guard_in_flight{class="batch"} 0.0' in metrics
