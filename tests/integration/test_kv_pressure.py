"""KV-cache headroom admission on a real vLLM with a deliberately small KV cache.

A stack of its own (40 KV blocks x 128 = 5,120 tokens, 16 slots, max_model_len 1024):
24 completions of ~550 prompt + 300 output tokens sent at once straight to vLLM make it
preempt; the same flood through the guard completes every request with no new
preemption, and vLLM's waiting queue stays within what the guard's KV budget admits.
The workload is vllm_guard/testing/kv_pressure.py's (benchmarks/kv_pressure.py runs it
larger).
"""

from __future__ import annotations

import asyncio

import pytest

from vllm_guard.testing.kv_pressure import BLOCK_SIZE, BLOCKS, CONFIG, VLLM_ARGS, compare
from vllm_guard.testing.stack import running_stack

pytestmark = pytest.mark.integration


async def _run() -> dict:
    async with running_stack(CONFIG, vllm_args=(*VLLM_ARGS, "--enforce-eager")) as stack:
        return await compare(stack, n=24, prompt_tokens=550, max_tokens=300)


def test_guard_absorbs_kv_overload_that_makes_vllm_preempt():
    result = asyncio.run(_run())
    direct, guard = result["direct"], result["guard"]
    assert direct["preemptions"] > 0, direct  # the setup really overloads the KV cache
    assert guard["ok"] == 24, guard["statuses"]
    assert guard["preemptions"] == 0
    # Batch may fill 0.9 - 0.2 of the cache; a request reserves ~850 tokens, so at most
    # 3 run at once and nothing needs to wait inside vLLM for blocks.
    budget = int(BLOCKS * BLOCK_SIZE * 0.7 // 850)
    assert guard["running_max"] <= budget
    assert guard["waiting_max"] <= budget
