"""Config reload and shadow mode on the real stack: a guard (`vllm-guard proxy`) in front of
the session's vLLM, reloaded while it carries load; shadow tenants next to enforced twins
sent the same traffic; and `vllm-guard reload` against `serve`, whose vLLM stays."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.testing.redis_server import RedisServer
from vllm_guard.testing.stack import start_proxy, stop, wait_healthy

pytestmark = pytest.mark.integration

KEYS = {
    "CHAT_KEY": "it-reload-chat-0a1b",
    "FLOOD_KEY": "it-reload-flood-2c3d",
    "EXTRA_KEY": "it-reload-extra-4e5f",
    "SHADOW_CHAT_KEY": "it-shadow-chat-6a7b",
    "ENFORCED_CHAT_KEY": "it-enforced-chat-8c9d",
    "SHADOW_BULK_KEY": "it-shadow-bulk-0e1f",
    "ENFORCED_BULK_KEY": "it-enforced-bulk-2a3b",
}
# Twins: the same limits, one in shadow mode. Interactive rejects over a limit; batch waits.
CHAT_LIMITS = "{requests_per_minute: 30, tokens_per_minute: 6000, burst: {requests_per_minute: 4, tokens_per_minute: 400}}"  # noqa: E501
BULK_LIMITS = "{requests_per_minute: 30, burst: {requests_per_minute: 3}}"
CONFIG = f"""
engine: {{max_num_seqs: 8, queue_ahead: 2, scheduler: vllm}}
guard:
  engine_key: "env:VLLM_GUARD_ENGINE_KEY"
classes:
  interactive: {{vllm_priority: 0, reserved_seqs: 2, max_wait_s: 30}}
  batch: {{vllm_priority: 10, max_queue: 500, max_wait_s: 60}}
tenants:
  chat: {{class: interactive, api_keys: ["env:CHAT_KEY"], limits: {{requests_per_minute: 100000}}}}
  flood: {{class: batch, api_keys: ["env:FLOOD_KEY"], limits: {{max_concurrent: 12}}}}
  shadow-chat: {{class: interactive, api_keys: ["env:SHADOW_CHAT_KEY"], limits: {CHAT_LIMITS}, shadow: true}}
  enforced-chat: {{class: interactive, api_keys: ["env:ENFORCED_CHAT_KEY"], limits: {CHAT_LIMITS}}}
  shadow-bulk: {{class: batch, api_keys: ["env:SHADOW_BULK_KEY"], limits: {BULK_LIMITS}, shadow: true}}
  enforced-bulk: {{class: batch, api_keys: ["env:ENFORCED_BULK_KEY"], limits: {BULK_LIMITS}}}
"""  # noqa: E501
EXTRA = '  extra: {class: batch, api_keys: ["env:EXTRA_KEY"]}\n'


@contextlib.contextmanager
def _proxy(stack, work: Path, text: str) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    config = work / "limits.yaml"
    config.write_text(text)
    env = {**KEYS, "VLLM_GUARD_ENGINE_KEY": stack.engine_key}
    port, log = free_port(), work / "guard.log"
    proc = start_proxy(stack.vllm_url, config, port, env, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 60, log)
        yield f"http://127.0.0.1:{port}", proc, config
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def guard(stack, tmp_path_factory):
    with _proxy(stack, tmp_path_factory.mktemp("reload"), CONFIG) as running:
        yield running


@pytest.fixture(scope="module")
def redis_guard(stack, tmp_path_factory):
    """The same config with its buckets in a real Redis."""
    redis = RedisServer().start()
    try:
        text = CONFIG.replace("guard:\n", f"guard:\n  quota_store: {redis.url}\n")
        with _proxy(stack, tmp_path_factory.mktemp("reload-redis"), text) as running:
            yield running
    finally:
        redis.close()


def _reload(pid: int) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vllm_guard", "reload", "--pid", str(pid)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def _client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEYS[key], max_retries=0, timeout=120)


def _metrics(url: str) -> dict:
    return parse_prometheus(httpx.get(url + "/metrics", timeout=10).text)


async def test_reloads_under_load_lose_no_request(guard):
    """A batch flood and streaming chat through the guard while its file is reloaded every
    0.3 s (a limit changed, a tenant added and removed): every request is answered 200, and
    the guard ends with nothing held."""
    url, proc, config = guard
    chat, flood = _client(url, "CHAT_KEY"), _client(url, "FLOOD_KEY")
    stop_at = time.monotonic() + 12
    statuses: list[str] = []

    async def flood_user() -> None:
        while time.monotonic() < stop_at:
            try:
                r = await flood.completions.create(model="tiny", prompt="batch", max_tokens=32)
                statuses.append("ok" if r.usage.completion_tokens else "empty")
            except openai.APIStatusError as exc:
                statuses.append(f"flood {exc.status_code}")

    async def chat_user() -> None:
        while time.monotonic() < stop_at:
            try:
                stream = await chat.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=8,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                usage = [c.usage async for c in stream if c.usage]
                statuses.append("ok" if usage else "no usage")
            except openai.APIStatusError as exc:
                statuses.append(f"chat {exc.status_code}")
            await asyncio.sleep(0.1)

    async def reloader() -> int:
        n = 0
        while time.monotonic() < stop_at:
            text = CONFIG.replace("max_concurrent: 12", f"max_concurrent: {10 + n % 5}")
            config.write_text(text + (EXTRA if n % 2 else ""))
            done = await asyncio.to_thread(_reload, proc.pid)
            assert done.returncode == 0, done.stderr
            n += 1
            await asyncio.sleep(0.3)
        return n

    users = [flood_user() for _ in range(16)] + [chat_user() for _ in range(2)]
    *_, reloads = await asyncio.gather(*users, reloader())
    await chat.close()
    await flood.close()
    config.write_text(CONFIG)
    assert _reload(proc.pid).returncode == 0
    assert reloads >= 10
    assert statuses and set(statuses) == {"ok"}, {s: statuses.count(s) for s in set(statuses)}
    m = _metrics(url)
    assert total(m, "vllm_guard_config_reloads_total", "result=ok") == reloads + 1
    assert total(m, "vllm_guard_config_reloads_total", "result=failed") == 0
    assert total(m, "vllm_guard_in_flight") == 0
    assert total(m, "vllm_guard_queue_depth") == 0


async def _replay(url: str, key: str, schedule: list[tuple[float, int, int]]) -> list[int]:
    """Send `schedule` (at second, requests, max_tokens) for one tenant; the statuses."""
    client = _client(url, key)
    started = time.monotonic()

    async def one(max_tokens: int) -> int:
        try:
            await client.completions.create(
                model="tiny",
                prompt="the same prompt each time",
                max_tokens=max_tokens,
                extra_body={"ignore_eos": True},  # usage = the estimate: nothing to settle
            )
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    tasks = []
    for at, count, max_tokens in schedule:
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        tasks += [asyncio.create_task(one(max_tokens)) for _ in range(count)]
    statuses = await asyncio.gather(*tasks)
    await client.close()
    return statuses


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_shadow_counts_what_enforcement_refuses_for_the_same_traffic(store, request):
    """The same schedule for a shadow tenant and its enforced twin, at the same time: the
    shadow one is served throughout, and its would-be refusals (and, in a waiting class,
    would-be delays) equal the refusals (delays) its twin got — with the buckets in this
    process, and in Redis."""
    url = request.getfixturevalue("guard" if store == "memory" else "redis_guard")[0]
    # 0 s: 8 at once (4 fit the request burst); 3 s: 4 (1.5 refilled: 1 fits); 9 s: 6 (3.5:
    # 3 fit); 12 s: two of ~260 tokens (the token burst of 400 has one).
    chat_schedule = [(0.0, 8, 40), (3.0, 4, 40), (9.0, 6, 40), (12.0, 2, 250)]
    # 0 s: 6 (3 fit, 3 wait); 4 s: 2 more wait behind them.
    bulk_schedule = [(0.0, 6, 8), (4.0, 2, 8)]
    before = _metrics(url)
    results = await asyncio.gather(
        _replay(url, "SHADOW_CHAT_KEY", chat_schedule),
        _replay(url, "ENFORCED_CHAT_KEY", chat_schedule),
        _replay(url, "SHADOW_BULK_KEY", bulk_schedule),
        _replay(url, "ENFORCED_BULK_KEY", bulk_schedule),
    )
    shadow_chat, enforced_chat, shadow_bulk, enforced_bulk = results
    after = _metrics(url)

    def counted(tenant: str, action: str) -> float:
        labels = (f"tenant={tenant}", f"action={action}")
        name = "vllm_guard_rate_limited_total"
        return total(after, name, *labels) - total(before, name, *labels)

    assert set(shadow_chat) == {200} and set(shadow_bulk) == {200}
    refused = enforced_chat.count(429)
    assert refused == 11, enforced_chat  # the schedule's arithmetic, enforced
    assert counted("shadow-chat", "shadow") == refused
    assert counted("shadow-chat", "rejected") == 0
    assert set(enforced_bulk) == {200}  # all waited their turn
    assert counted("enforced-bulk", "delayed") == 5
    assert counted("shadow-bulk", "shadow") == counted("enforced-bulk", "delayed")


def test_serve_reloads_without_touching_vllm(stack):
    """`vllm-guard reload` against `serve`: the guard answers, vLLM keeps its processes."""
    before = stack.vllm_pids()
    done = _reload(stack.proc.pid)
    assert done.returncode == 0, done.stderr
    assert "reloaded: nothing changed" in done.stdout
    assert stack.vllm_pids() == before
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.keys["CHAT_UI_KEY"]) as client:
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage
