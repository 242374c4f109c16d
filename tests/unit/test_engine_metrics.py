"""Reading vLLM's /metrics: the series the guard needs, across versions, never an error."""

from __future__ import annotations

from pathlib import Path

from vllm_guard.engine_metrics import parse_engine_metrics

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
