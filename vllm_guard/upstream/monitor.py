"""The engine's own view of its load, read from vLLM's Prometheus `/metrics`.

`parse_engine_metrics` is pure: it picks the few series the guard needs out of the text
(about 50 KB, 700 lines on vLLM 0.32) by line prefix, without a full Prometheus parser, and
tolerates what changes across vLLM versions: the KV usage gauge is
`vllm:kv_cache_usage_perc` (newer) or `vllm:gpu_cache_usage_perc` (older), and KV capacity
comes from `vllm:cache_config_info`'s `kv_cache_size_tokens` label or, where that is
missing, `num_gpu_blocks x block_size`. Anything missing is None, never an error. With
several engines (data parallel) counts are summed and the usage is the highest one.

`EngineMonitor` polls it (default every 100 ms, short timeouts), keeps the latest
sample, and tells its listener after every poll; a sample older than `stale_after_s`
makes the state stale, which is logged once per episode and exported as a metric.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from vllm_guard.upstream.answers import count, dig, finite, parse_json

log = logging.getLogger("vllm_guard.upstream.monitor")

_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_PREEMPTIONS = "vllm:num_preemptions_total"
_TOKENS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
_CACHE_INFO = "vllm:cache_config_info"
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True, slots=True)
class EngineSample:
    """One read of the engine's metrics. `kv_usage` is a fraction of `kv_capacity_tokens`."""

    at: float
    kv_capacity_tokens: int | None = None
    kv_usage: float | None = None
    running: int | None = None
    waiting: int | None = None
    preemptions: int | None = None
    tokens: int | None = None
    """Prompt + generated tokens the engine processed since it started (progress)."""

    @property
    def busy(self) -> bool:
        """The engine reports requests running or waiting."""
        return bool(self.running) or bool(self.waiting)

    @property
    def kv_used_tokens(self) -> int | None:
        if self.kv_usage is None or self.kv_capacity_tokens is None:
            return None
        return round(self.kv_usage * self.kv_capacity_tokens)


def parse_engine_metrics(text: str, at: float) -> EngineSample:
    usage: float | None = None
    counts: dict[str, float] = {}
    capacity: int | None = None
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{")
        if not rest:  # no labels: "name value"
            name, _, rest = line.partition(" ")
            rest = "} " + rest
        if name in _USAGE:
            value = _value(rest)
            if value is not None:
                usage = value if usage is None else max(usage, value)
        elif name in (_RUNNING, _WAITING, _PREEMPTIONS) or name in _TOKENS:
            value = _value(rest)
            if value is not None:
                counts[name] = counts.get(name, 0.0) + value
        elif name == _CACHE_INFO:
            found = _capacity(dict(_LABEL.findall(rest)))
            if found is not None:
                capacity = found + (capacity or 0)
    return EngineSample(
        at=at,
        kv_capacity_tokens=capacity,
        kv_usage=usage,
        running=_int(counts.get(_RUNNING)),
        waiting=_int(counts.get(_WAITING)),
        preemptions=_int(counts.get(_PREEMPTIONS)),
        tokens=_int(sum(counts[n] for n in _TOKENS)) if all(n in counts for n in _TOKENS) else None,
    )


def _value(rest: str) -> float | None:
    """The sample value after the label set (`...} 1.5` or `...} 1.5 1700000000000`)."""
    fields = rest.rpartition("}")[2].split()
    try:
        return finite(float(fields[0])) if fields else None
    except ValueError:
        return None


def _capacity(labels: dict[str, str]) -> int | None:
    tokens = _positive_int(labels.get("kv_cache_size_tokens"))
    if tokens is not None:
        return tokens
    blocks = _positive_int(labels.get("num_gpu_blocks"))
    block_size = _positive_int(labels.get("block_size"))
    return blocks * block_size if blocks is not None and block_size is not None else None


def _positive_int(text: str | None) -> int | None:
    try:
        value = finite(float(text)) if text is not None else None
    except ValueError:
        return None
    return int(value) if value is not None and value >= 1 else None


def _int(value: float | None) -> int | None:
    return None if value is None else round(value)


class EngineMonitor:
    """Polls `base_url/metrics` (and once `/v1/models` for `max_model_len`)."""

    def __init__(
        self,
        base_url: str,
        listener: Callable[[EngineSample | None], None],
        interval_s: float = 0.1,
        stale_after_s: float = 1.0,
        headers: dict[str, str] | None = None,
        fallback: str = "admitting on the guard's own accounting",
    ) -> None:
        self.base_url = base_url
        self.listener = listener
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self.headers = headers or {}
        self.fallback = fallback
        self._models_due = 0.0
        self.sample: EngineSample | None = None
        self.text: bytes | None = None  # the last /metrics read, for /metrics/engine
        self.max_model_len: int | None = None
        self.stale = True
        self._was_fresh = False

    def current(self, now: float) -> EngineSample | None:
        """The latest sample, or None when there is none younger than `stale_after_s`."""
        sample = self.sample
        if sample is None or now - sample.at > self.stale_after_s:
            return None
        return sample

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=max(0.5, 5 * self.interval_s))
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            while True:
                try:
                    if self.max_model_len is None and loop.time() >= self._models_due:
                        self._models_due = loop.time() + 5.0
                        self.max_model_len = await _max_model_len(session, self.base_url)
                    async with session.get(self.base_url + "/metrics") as resp:
                        if resp.status == 200:
                            self.text = await resp.read()
                            text = self.text.decode("utf-8", "replace")
                            self.sample = parse_engine_metrics(text, loop.time())
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    pass
                self._publish(loop.time())
                await asyncio.sleep(self.interval_s)

    def _publish(self, now: float) -> None:
        current = self.current(now)
        stale = current is None or current.kv_usage is None
        if stale != self.stale:
            self.stale = stale
            if stale:
                log.warning(
                    "engine metrics stale (no KV usage readable for %.1f s): %s",
                    self.stale_after_s,
                    self.fallback,
                )
            else:
                assert current is not None
                log.info(
                    "engine metrics %s: KV capacity %s tokens, max_model_len %s",
                    "fresh again" if self._was_fresh else "readable",
                    current.kv_capacity_tokens,
                    self.max_model_len,
                )
                self._was_fresh = True
        self.listener(None if stale else current)


async def _max_model_len(session: aiohttp.ClientSession, base_url: str) -> int | None:
    async with session.get(base_url + "/v1/models") as resp:
        if resp.status != 200:
            return None
        data = dig(parse_json(await resp.read()), "data")
    if not isinstance(data, list):
        return None
    valid = [n for m in data if (n := count(dig(m, "max_model_len")))]
    return min(valid) if valid else None
