"""The soak's short run (benchmarks/soak.py runs it for 20 minutes): a minute of mixed,
misbehaving load with vLLM killed halfway, then nothing held, nothing lost."""

from __future__ import annotations

import asyncio

import pytest

from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.soak import CONFIG, KEY_VARS, Soak, summary
from vllm_guard.testing.stack import running_stack

pytestmark = pytest.mark.integration


async def _run() -> dict:
    async with running_stack(CONFIG, key_vars=KEY_VARS, metrics_port=free_port()) as stack:
        return summary(await Soak(stack, duration_s=60, clients=9).run(), warmup_s=10)


def test_a_short_soak_leaks_nothing_and_loses_nothing():
    s = asyncio.run(_run())
    after = s["after"]
    assert s["sent"] > 100
    assert len(s["engine_down_s"]) == 1
    assert s["bad"] == [], s
    assert after["vllm_guard_in_flight"] == 0
    assert after["vllm_guard_queue_depth"] == 0
    assert after["vllm_guard_kv_reserved_tokens"] == 0
    assert after["concurrency_ETL_KEY"] == "4/4" and after["concurrency_REPORTS_KEY"] == "2/2"
    assert after["guard_counted"] == after["client_sent"], after
    assert s["outcomes"].get("ok", 0) > 50
