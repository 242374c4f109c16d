"""`vllm-guard proxy` as a process, in front of a stand-in engine (tests/unit/fake_upstream.py
run as a program): what happens on real sockets between clients, the guard and an engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import signal
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
from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.stack import start_proxy, stop, wait_healthy

CONFIG = """
engine: {max_num_seqs: 128, queue_ahead: 0, kv_admission: false}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 1, max_queue: 100}
  batch: {vllm_priority: 10, max_queue: 100}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"]}
"""


@contextlib.contextmanager
def _guard_process(
    tmp_path: Path, config_text: str, mode: str = "big", extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[int, Path, subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """A stand-in engine in `mode` (streaming mode "big" by default), `vllm-guard proxy`
    before it: the guard's port, the processes' log, the guard process."""
    engine_port, guard_port = free_port(), free_port()
    config = tmp_path / "limits.yaml"
    config.write_text(config_text)
    log = tmp_path / "processes.log"
    engine_cmd = [
        sys.executable, "-m", "tests.unit.fake_upstream", "--port", str(engine_port),
        "--mode", mode,
    ]  # fmt: skip
    with open(log, "ab") as out:
        engine = subprocess.Popen(engine_cmd, stdout=out, stderr=out)
    upstream = f"http://127.0.0.1:{engine_port}"
    guard = start_proxy(upstream, config, guard_port, KEYS, log, extra_args=extra_args)
    try:
        wait_healthy(upstream, engine, 30, log)
        wait_healthy(f"http://127.0.0.1:{guard_port}", guard, 30, log)
        yield guard_port, log, guard, engine
    finally:
        for proc in (guard, engine):
            stop(proc, 10)


@pytest.fixture
def guarded(tmp_path) -> Iterator[tuple[int, Path]]:
    with _guard_process(tmp_path, CONFIG) as (port, log, _proc, _engine):
        yield port, log


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


# -- connection bounds -------------------------------------------------------------------

BOUNDED = CONFIG.replace(
    "engine:",
    "guard: {max_header_bytes: 4096, max_headers: 20, header_timeout_s: 1.0, "
    "body_timeout_s: 1.0, max_connections: 6, send_stall_timeout_s: 1.0}\nengine:",
)


@pytest.fixture(scope="module")
def bounded(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    with _guard_process(tmp_path_factory.mktemp("bounded"), BOUNDED) as (port, log, _proc, _engine):
        yield port, log


def _exchange(port: int, data: bytes, wait_s: float = 5.0) -> tuple[bytes, float]:
    """Send `data`, read until the guard closes; the answer and how long it took."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait_s)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer, time.monotonic() - started


def _error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split()[1]), json.loads(body)["error"]


REQUEST_LINE = b"POST /v1/completions HTTP/1.1\r\nhost: guard\r\n"


@pytest.mark.parametrize(
    "extra",
    [
        b"x-big: " + b"a" * (8 * 2**20) + b"\r\n",  # one 8 MiB header
        b"".join(b"x-h%d: 1\r\n" % i for i in range(30)),  # 30 headers
        b"x-big: " + b"a" * 5000 + b"\r\n",  # just past the 4 KiB bound
    ],
    ids=["8MiB", "30-headers", "5000B"],
)
def test_a_request_head_past_its_bounds_is_a_431(bounded, extra):
    port, _ = bounded
    answer, took_s = _exchange(port, REQUEST_LINE + extra + b"content-length: 2\r\n\r\n{}")
    status, error = _error(answer)
    assert (status, error["code"]) == (431, "request_header_too_large")
    assert took_s < 1.0  # refused on arrival, not after a deadline


@pytest.mark.parametrize(
    "data",
    [
        b"",  # connects and sends nothing
        REQUEST_LINE + b"authorization: Bearer chat-",  # half a head, then silence
    ],
    ids=["nothing", "half-head"],
)
def test_a_head_that_does_not_arrive_in_time_is_a_408(bounded, data):
    port, _ = bounded
    answer, took_s = _exchange(port, data)
    status, error = _error(answer)
    assert (status, error["code"]) == (408, "request_timeout")
    assert 0.9 < took_s < 3.0


def test_a_body_that_does_not_arrive_in_time_is_a_408_and_holds_nothing(bounded):
    port, _ = bounded
    head = REQUEST_LINE + b"authorization: Bearer chat-secret\r\ncontent-length: 100\r\n\r\n"
    answer, took_s = _exchange(port, head + b'{"prompt": "x",')
    status, error = _error(answer)
    assert (status, error["code"]) == (408, "request_timeout")
    assert 0.9 < took_s < 3.0
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'vllm_guard_in_flight{class="interactive"} 0.0' in metrics


def test_connections_past_the_limit_get_503(bounded):
    port, _ = bounded
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    try:
        time.sleep(0.2)
        answer, took_s = _exchange(port, b"")
        status, error = _error(answer)
        assert (status, error["code"]) == (503, "too_many_connections")
        assert b"retry-after:" in answer.lower() and took_s < 0.5
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)  # the guard sees them close; a new connection is served again
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200


def test_a_client_that_stops_reading_a_stream_is_dropped_and_releases_its_slot(bounded):
    port, _ = bounded
    sock = _stalled_stream(port, 16 * 2**20)  # reads none of 16 MiB
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        held = 'vllm_guard_in_flight{class="interactive"} 1.0'
        deadline = time.monotonic() + 5
        while held not in httpx.get(url).text:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.05)
        started = time.monotonic()
        while held in (text := httpx.get(url).text):
            assert time.monotonic() - started < 5, "the stalled client still holds its slot"
            time.sleep(0.1)
        assert time.monotonic() - started > 0.5  # after the stall timeout, not at once
        assert 'vllm_guard_in_flight{class="interactive"} 0.0' in text
        assert 'vllm_guard_requests_total{class="interactive",outcome="client_disconnect"} 1.0' in (
            text
        )
    finally:
        sock.close()


ONE_SLOT = """
engine: {max_num_seqs: 1, queue_ahead: 0, kv_admission: false, scheduler: vllm}
guard: {drain_timeout_s: 10, unavailable_retry_after_s: 7}
classes:
  interactive: {vllm_priority: 0, max_queue: 100, max_wait_s: 60}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
"""


def test_a_drain_answers_queued_requests_at_once_with_a_json_503(tmp_path):
    """SIGTERM while one request runs (the stand-in engine holds it) and three wait for its
    slot: the waiting ones get the OpenAI-format 503 with retry-after at once, not uvicorn's
    plain-text 500 when the drain timeout ends."""
    with _guard_process(tmp_path, ONE_SLOT, mode="hang") as (port, _log, proc, _engine):
        url = f"http://127.0.0.1:{port}/v1/completions"
        headers = {"authorization": "Bearer chat-secret"}
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}

        async def run() -> list[tuple[int, str, float, dict]]:
            async with httpx.AsyncClient(timeout=30) as client:

                async def one() -> tuple[int, str, float, dict]:
                    r = await client.post(url, json=body, headers=headers)
                    return (
                        r.status_code,
                        r.headers.get("retry-after", ""),
                        time.monotonic(),
                        (
                            r.json()
                            if r.headers.get("content-type", "").startswith("application/json")
                            else {"raw": r.text}
                        ),
                    )

                holder = asyncio.create_task(one())
                await asyncio.sleep(0.5)  # it holds the slot
                queued = [asyncio.create_task(one()) for _ in range(3)]
                await asyncio.sleep(0.5)  # they wait in the guard's queue
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                done = await asyncio.gather(*queued)
                holder.cancel()
                return [(s, ra, t - sent, j) for s, ra, t, j in done]

        for status, retry_after, after_s, payload in asyncio.run(run()):
            assert status == 503, payload
            assert payload["error"]["code"] == "shutting_down"
            assert retry_after == "7"
            assert after_s < 2.0


def test_sighup_reloads_without_ending_the_guard_or_its_streams(tmp_path):
    with _guard_process(tmp_path, ONE_SLOT, mode="slow") as (port, log, proc, _engine):
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": True}
        with httpx.stream(
            "POST", url, json=body, headers={"authorization": "Bearer chat-secret"}, timeout=30
        ) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGHUP)
            rest = list(lines)
        assert rest[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in rest
        time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-2000:]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        assert "reloaded: nothing changed" in log.read_text()


def _reload(pid: int) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vllm_guard", "reload", "--pid", str(pid), "--timeout", "10"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_the_reload_command_applies_a_file_or_says_why_it_kept_the_old_one(tmp_path):
    with _guard_process(tmp_path, ONE_SLOT, mode="ok") as (port, _log, proc, _engine):
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
        etl = {"authorization": "Bearer etl-secret"}
        assert httpx.post(url, json=body, headers=etl, timeout=10).status_code == 401
        config = tmp_path / "limits.yaml"
        added = ONE_SLOT + '  nightly-etl: {class: interactive, api_keys: ["env:ETL_KEY"]}\n'
        config.write_text(added)
        done = _reload(proc.pid)
        assert done.returncode == 0, done.stderr
        assert "tenants added: nightly-etl" in done.stdout
        assert httpx.post(url, json=body, headers=etl, timeout=10).status_code == 200

        config.write_text(added.replace("max_queue: 100", "max_queue: -1"))
        done = _reload(proc.pid)
        assert done.returncode == 1
        assert "classes.interactive.max_queue" in done.stderr
        config.write_text(added.replace("max_num_seqs: 1", "max_num_seqs: 2"))
        done = _reload(proc.pid)
        assert done.returncode == 1
        assert "engine.max_num_seqs changed (1 -> 2)" in done.stderr
        # The last good file still rules.
        assert httpx.post(url, json=body, headers=etl, timeout=10).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'vllm_guard_config_reloads_total{result="failed"} 2.0' in metrics
        assert "vllm_guard_config_last_reload_successful 0.0" in metrics
        assert proc.poll() is None

    # Not a vllm-guard: refused before any signal is sent.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        done = _reload(other.pid)
        assert done.returncode == 2 and "is not vllm-guard" in done.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("where", ["flag", "config"])
def test_metrics_on_a_port_of_their_own_are_not_on_the_public_one(tmp_path, where):
    metrics_port = free_port()
    config, args = CONFIG, ("--metrics-port", str(metrics_port))
    if where == "config":
        config, args = CONFIG + f"guard: {{metrics_port: {metrics_port}}}\n", ()
    with _guard_process(tmp_path, config, mode="ok", extra_args=args) as guarded:
        port = guarded[0]
        public, private = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
        r = httpx.post(
            public + "/v1/completions",
            json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
            headers={"authorization": "Bearer chat-secret"},
        )
        assert r.status_code == 200
        for path in ("/metrics", "/metrics/engine"):
            assert httpx.get(public + path).status_code == 404
        metrics = httpx.get(private + "/metrics")
        assert metrics.status_code == 200
        assert 'vllm_guard_tenant_requests_total{tenant="chat-ui"} 1.0' in metrics.text
        assert httpx.get(private + "/metrics/engine").status_code in (200, 503)
        assert httpx.get(private + "/v1/models").status_code == 404
        assert httpx.get(public + "/health").status_code == 200


HANG = ONE_SLOT.replace("engine: {", "engine: {hang_detect_s: 2, ")


def test_a_stopped_engine_is_noticed_and_its_requests_end(tmp_path):
    """SIGSTOP the engine while a request is in it: within seconds the guard answers 503
    (health and new requests) and ends the request in flight instead of holding its slot
    until the 600 s read timeout; SIGCONT, and it serves again without a restart."""
    with _guard_process(tmp_path, HANG, mode="hang") as (port, log, _proc, engine):
        url = f"http://127.0.0.1:{port}"
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
        headers = {"authorization": "Bearer chat-secret"}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(
                httpx.post, url + "/v1/completions", json=body, headers=headers, timeout=60
            )
            time.sleep(1.0)
            engine.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                answer = held.result(timeout=20)
                ended_after = time.monotonic() - stopped
                health = httpx.get(url + "/health", timeout=5)
                refused = httpx.post(url + "/v1/completions", json=body, headers=headers)
            finally:
                engine.send_signal(signal.SIGCONT)
        assert answer.status_code == 503, answer.text
        assert ended_after < 10
        assert health.status_code == 503
        assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
        deadline = time.monotonic() + 15
        while httpx.get(url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert "engine hung" in log.read_text()


WAITS_ON_BUDGET = """
engine: {max_num_seqs: 4, queue_ahead: 0, kv_admission: false, scheduler: vllm}
guard: {drain_timeout_s: 10, unavailable_retry_after_s: 7}
classes:
  batch: {vllm_priority: 10, max_queue: 100, max_wait_s: 60, on_limit: wait}
tenants:
  nightly-etl:
    class: batch
    api_keys: ["env:ETL_KEY"]
    limits: {requests_per_minute: 1}
"""


def test_a_drain_answers_requests_waiting_for_their_tenants_budget_at_once(tmp_path):
    with _guard_process(tmp_path, WAITS_ON_BUDGET, mode="ok") as (port, _log, proc, _engine):
        url = f"http://127.0.0.1:{port}/v1/completions"
        headers = {"authorization": "Bearer etl-secret"}
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
        assert httpx.post(url, json=body, headers=headers).status_code == 200  # the budget

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, url, json=body, headers=headers, timeout=60)
            time.sleep(1.0)  # it waits for a minute's budget
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            answer = waiting.result(timeout=30)
            after_s = time.monotonic() - sent
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "shutting_down"
        assert answer.headers["retry-after"] == "7"
        assert after_s < 2.0
