"""A soak: long, mixed, misbehaving load through `serve`, then proof that nothing leaked.
The workload of benchmarks/soak.py (about 20 minutes) and of its short run in the test suite
(tests/integration/test_soak.py).

Clients (one aiohttp request each, in loops) for `duration_s`: interactive chat streams
(10 % of them leave after the first event), batch completions from two tenants with
limits (some streamed, some cut off at a random moment, some read slowly), and vLLM killed
once in the middle. Every 2 s: the guard's RSS, what it holds in flight, its queues and
KV reservations, and the errors so far. Afterwards: in flight, KV reserved and queues back
to zero, each limited tenant's concurrency whole again (it can run `max_concurrent` at
once), every request the clients sent counted by the guard, and no 5xx but 503s while
the engine was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil

from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.testing.stack import Stack

CONFIG = """
engine: {max_num_seqs: 8, queue_ahead: 2}
guard: {unavailable_retry_after_s: 1, send_stall_timeout_s: 5}
classes:
  interactive: {vllm_priority: 0, max_queue: 100, max_wait_s: 20}
  batch: {vllm_priority: 10, max_queue: 200, max_wait_s: 60, on_limit: wait}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  nightly-etl:
    class: batch
    api_keys: ["env:ETL_KEY"]
    limits: {max_concurrent: 4, tokens_per_minute: 600000}
  reports:
    class: batch
    api_keys: ["env:REPORTS_KEY"]
    limits: {max_concurrent: 2, requests_per_minute: 600}
"""
KEY_VARS = ("CHAT_UI_KEY", "ETL_KEY", "REPORTS_KEY")
HELD = ("vllm_guard_in_flight", "vllm_guard_queue_depth", "vllm_guard_kv_reserved_tokens")
"""What the guard holds for requests: all 0 once the load has ended."""
CONCURRENCY = {"ETL_KEY": 4, "REPORTS_KEY": 2}


@dataclass
class SoakResult:
    sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)
    """Answers that should not happen: a 5xx other than 503 while the engine was down."""
    timeline: list[tuple[float, float, float, float, float, float]] = field(default_factory=list)
    """(s, guard RSS MiB, in flight, queued, KV reserved tokens, errors so far)."""
    engine_down: list[tuple[float, float]] = field(default_factory=list)
    after: dict[str, Any] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class Soak:
    def __init__(self, stack: Stack, duration_s: float, clients: int, seed: int = 7) -> None:
        self.stack = stack
        self.duration_s = duration_s
        self.clients = clients
        self.rng = random.Random(seed)
        self.result = SoakResult()
        self.t0 = 0.0
        self.down_since: float | None = None

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _engine_is_down(self) -> bool:
        now = self._now()
        return self.down_since is not None or any(
            a - 2 <= now <= b + 2 for a, b in self.result.engine_down
        )

    async def run(self) -> SoakResult:
        self.t0 = time.monotonic()
        guard = psutil.Process(self.stack.proc.pid if self.stack.proc else 0)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            end = self.t0 + self.duration_s
            tasks = [asyncio.create_task(self._client(s, i, end)) for i in range(self.clients)]
            sampler = asyncio.create_task(self._sample(s, guard))
            killer = asyncio.create_task(self._kill_engine_midway(s))
            await asyncio.gather(*tasks)
            await killer
            await self._settle(s)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            await self._check_after(s)
        return self.result

    # -- load ----------------------------------------------------------------------------

    async def _client(self, s: aiohttp.ClientSession, i: int, end: float) -> None:
        key = KEY_VARS[i % 3]
        while time.monotonic() < end:
            await self._one(s, key)
            await asyncio.sleep(self.rng.uniform(0, 0.3))

    async def _one(self, s: aiohttp.ClientSession, key_var: str) -> None:
        rng, r = self.rng, self.result
        chat = key_var == "CHAT_UI_KEY"
        stream = chat or rng.random() < 0.5
        body: dict[str, Any] = {"model": "tiny", "stream": stream, "ignore_eos": True}
        if chat:
            path = "/v1/chat/completions"
            body |= {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
        else:
            path = "/v1/completions"
            body |= {"prompt": "a report " * rng.randint(1, 40), "max_tokens": rng.randint(8, 96)}
        leave_after = rng.random() < 0.1  # leaves after the first event
        cut_at = rng.uniform(0.05, 1.0) if not chat and rng.random() < 0.1 else None
        slow = not chat and rng.random() < 0.1
        headers = {"Authorization": f"Bearer {self.stack.keys[key_var]}"}
        r.sent += 1
        try:
            async with (
                asyncio.timeout(cut_at) if cut_at else contextlib.nullcontext(),
                s.post(self.stack.guard_url + path, json=body, headers=headers) as resp,
            ):
                if resp.status >= 500 and not (resp.status == 503 and self._engine_is_down()):
                    r.bad.append(f"{resp.status} at {self._now():.0f} s")
                if resp.status != 200:
                    r.count(str(resp.status))
                    await resp.read()
                    return
                async for _ in resp.content.iter_any():
                    if leave_after and stream:
                        r.count("left mid-stream")
                        return
                    if slow:
                        await asyncio.sleep(0.05)
            r.count("ok")
        except TimeoutError:
            r.count("cut by the client")
        except aiohttp.ClientError as exc:
            if self._engine_is_down():
                r.count("broken while the engine was down")
            else:
                r.bad.append(f"{type(exc).__name__} at {self._now():.0f} s")

    async def _kill_engine_midway(self, s: aiohttp.ClientSession) -> None:
        await asyncio.sleep(self.duration_s / 2)
        assert self.stack.proc is not None
        (vllm,) = [
            p
            for p in psutil.Process(self.stack.proc.pid).children()
            if "vllm" in " ".join(p.cmdline())
        ]
        self.down_since = self._now()
        vllm.kill()
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.get(self.stack.guard_url + "/health") as resp:
                    if resp.status == 200:
                        break
        self.result.engine_down.append((self.down_since, self._now()))
        self.down_since = None

    # -- observation ---------------------------------------------------------------------

    async def _metrics(self, s: aiohttp.ClientSession) -> dict[str, float]:
        async with s.get(self.stack.metrics_url + "/metrics") as resp:
            return parse_prometheus(await resp.text())

    async def _sample(self, s: aiohttp.ClientSession, guard: psutil.Process) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                m = await self._metrics(s)
                self.result.timeline.append(
                    (
                        self._now(),
                        guard.memory_info().rss / 2**20,
                        total(m, "vllm_guard_in_flight"),
                        total(m, "vllm_guard_queue_depth"),
                        total(m, "vllm_guard_kv_reserved_tokens"),
                        float(len(self.result.bad)),
                    )
                )
            await asyncio.sleep(2)

    async def _settle(self, s: aiohttp.ClientSession, timeout_s: float = 90) -> None:
        """Until the guard holds and queues nothing (slow readers' slots come back after
        send_stall_timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = await self._metrics(s)
            if not any(total(m, name) for name in HELD):
                return
            await asyncio.sleep(1)

    async def _check_after(self, s: aiohttp.ClientSession) -> None:
        m = await self._metrics(s)
        after = self.result.after
        for name in HELD:
            after[name] = total(m, name)
        after["guard_counted"] = total(m, "vllm_guard_requests_total") + total(
            m, "vllm_guard_rate_limited_total", "action=rejected"
        )
        after["client_sent"] = self.result.sent
        # Each limited tenant can run its whole max_concurrent at once again.
        for key_var, n in CONCURRENCY.items():
            headers = {"Authorization": f"Bearer {self.stack.keys[key_var]}"}
            body = {"model": "tiny", "prompt": "x", "max_tokens": 2}

            async def one(h: dict[str, str] = headers, b: dict[str, Any] = body) -> int:
                async with s.post(self.stack.guard_url + "/v1/completions", json=b, headers=h) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one() for _ in range(n)))
            after[f"concurrency_{key_var}"] = f"{statuses.count(200)}/{n}"
        guard = psutil.Process(self.stack.proc.pid if self.stack.proc else 0)
        after["rss_mib_end"] = guard.memory_info().rss / 2**20


def summary(result: SoakResult, warmup_s: float = 30) -> dict[str, Any]:
    rss = [(t, m) for t, m, *_ in result.timeline]
    after_warmup = [m for t, m in rss if t >= warmup_s] or [m for _, m in rss]
    return {
        "sent": result.sent,
        "outcomes": result.outcomes,
        "bad": result.bad,
        "engine_down_s": [[round(a, 1), round(b, 1)] for a, b in result.engine_down],
        "rss_mib_after_warmup": after_warmup[0] if after_warmup else None,
        "rss_mib_max": max(after_warmup, default=None),
        "rss_growth_mib": (max(after_warmup) - after_warmup[0]) if after_warmup else None,
        "after": result.after,
    }


def dumps(result: SoakResult) -> str:
    return json.dumps({"summary": summary(result), "timeline": result.timeline}, indent=2)
