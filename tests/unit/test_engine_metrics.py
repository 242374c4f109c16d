"""Reading vLLM's /metrics: the series the guard needs, across versions, never an error."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from tests.conftest import KEYS
from tests.unit.asgi import call
from tests.unit.conftest import ready_app, until
from vllm_guard.config import parse_config
from vllm_guard.proxy.metrics import render
from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.upstream.monitor import EngineMonitor, EngineSample, parse_engine_metrics

REAL = (Path(__file__).parent / "data" / "vllm_metrics.txt").read_text()  # vLLM 0.32 (CPU)


def test_reads_a_real_vllm_scrape():
    s = parse_engine_metrics(REAL, at=5.0)
    assert s.at == 5.0
    assert s.kv_capacity_tokens == 2097152  # kv_cache_size_tokens (= 16384 blocks x 128)
    assert s.kv_usage is not None and 0 < s.kv_usage < 0.001
    assert (s.running, s.waiting, s.preemptions) == (2, 0, 0)
    assert s.kv_used_tokens == round(s.kv_usage * 2097152)


def test_older_names_and_blocks_times_block_size():
    text = "\n".join(
        [
            "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage.",
            'vllm:gpu_cache_usage_perc{model_name="m"} 0.25',
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",x="None"} 1.0',
            'vllm:num_requests_running{model_name="m"} 3.0',
            "vllm:num_preemptions_total 7",
        ]
    )
    s = parse_engine_metrics(text, at=0.0)
    assert s.kv_capacity_tokens == 16000
    assert s.kv_usage == 0.25
    assert s.kv_used_tokens == 4000
    assert (s.running, s.waiting, s.preemptions) == (3, None, 7)


def test_data_parallel_engines_add_up_and_usage_is_the_highest():
    text = "\n".join(
        [
            'vllm:kv_cache_usage_perc{engine="0"} 0.1',
            'vllm:kv_cache_usage_perc{engine="1"} 0.6',
            'vllm:num_requests_waiting{engine="0"} 2',
            'vllm:num_requests_waiting{engine="1"} 5',
            'vllm:cache_config_info{engine="0",kv_cache_size_tokens="100"} 1',
            'vllm:cache_config_info{engine="1",kv_cache_size_tokens="100"} 1',
        ]
    )
    s = parse_engine_metrics(text, at=0.0)
    assert (s.kv_usage, s.waiting, s.kv_capacity_tokens) == (0.6, 7, 200)


def test_missing_or_garbled_series_are_none():
    s = parse_engine_metrics(
        'vllm:kv_cache_usage_perc{a="b"} NaNx\nvllm:cache_config_info{num_gpu_blocks="None"} 1\n'
        "not a metric line\n",
        at=1.0,
    )
    assert s.kv_usage is None and s.kv_capacity_tokens is None and s.kv_used_tokens is None
    assert parse_engine_metrics("", at=0.0).running is None


async def test_monitor_reads_then_goes_stale_and_says_so(fake, caplog):
    seen: list[EngineSample | None] = []
    monitor = EngineMonitor(fake.url, seen.append, interval_s=0.02, stale_after_s=0.2)
    task = asyncio.create_task(monitor.run())
    try:
        await until(lambda: seen and seen[-1] is not None)
        assert monitor.max_model_len == 4096
        assert seen[-1].kv_capacity_tokens == 2097152
        assert not monitor.stale
        assert monitor.text is not None and b"vllm:kv_cache_usage_perc" in monitor.text
        fake.metrics_status = 500
        with caplog.at_level(logging.WARNING, "vllm_guard.upstream.monitor"):
            await until(lambda: monitor.stale)
        assert seen[-1] is None
        assert "engine metrics stale" in caplog.text
        fake.metrics_status = 200
        await until(lambda: not monitor.stale)
    finally:
        task.cancel()


KV_APP_CONFIG = """
engine: {max_num_seqs: 4, kv_watermark: 0.9}
classes:
  interactive: {vllm_priority: 0, max_wait_s: 5}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
"""


async def test_app_admits_by_kv_headroom_and_tokenizes_only_when_the_bound_does_not_fit(fake):
    app = ready_app(parse_config(KV_APP_CONFIG, "kv.yaml", KEYS), fake)
    small = EngineSample(at=0.0, kv_capacity_tokens=1000, kv_usage=0.0)
    app.engine_sample(small)
    fake.mode = "hang"
    chat = {"Authorization": "Bearer chat-secret"}
    first = asyncio.create_task(
        call(app, "POST", "/v1/completions", chat, {"prompt": "a", "max_tokens": 700})
    )
    await until(lambda: fake.active == 1)
    assert fake.tokenize_calls == 0  # body bytes + 16 + 700 fits 900: the bound was enough
    forwarded = len(json.dumps(fake.requests[0][1], separators=(",", ":")))
    bound = forwarded + 16 + 700
    assert app.admission.kv.reserved == bound
    second = asyncio.create_task(
        call(app, "POST", "/v1/completions", chat, {"prompt": "b", "max_tokens": 300})
    )
    await until(lambda: app.admission.statistics()[0].queued == 1)
    assert fake.tokenize_calls == 1  # its bound did not fit; the exact 1 + 300 does not either
    assert fake.active == 1  # slots are free: KV alone holds it back
    body, _ = render(app.metrics.registry)
    assert total(parse_prometheus(body.decode()), "vllm_guard_kv_reserved_tokens") == bound
    fake.mode = "ok"
    fake.release.set()
    assert (await first).status == 200
    assert (await second).status == 200
    assert app.admission.kv.reserved == 0
    await app.upstream.close()
