"""Weighted fair queueing on the real engine: a flood does not delay another tenant.

`bulk` may fill 3 of the 4 engine slots; its waiters are ordered by fair queueing.
"""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.integration


async def _wait_ms(client) -> float:
    raw = await client.completions.with_raw_response.create(
        model="tiny", prompt="bulk job line", max_tokens=32, extra_body={"ignore_eos": True}
    )
    return float(raw.headers["x-vllm-guard-queue-ms"])


async def test_a_tenant_arriving_behind_a_flood_is_served_within_a_few_requests(stack):
    async with (
        stack.async_client("BULK_FLOOD_KEY") as flood,
        stack.async_client("BULK_TRICKLE_KEY") as trickle,
    ):
        floods = [asyncio.create_task(_wait_ms(flood)) for _ in range(30)]
        while await stack.aguard_metric("vllm_guard_queue_depth", 'class="bulk"') < 20:
            await asyncio.sleep(0.05)
        trickle_ms = await _wait_ms(trickle)
        flood_ms = sorted(await asyncio.gather(*floods))
    # In FIFO order it would wait behind 20+ queued requests, about as long as the last of
    # them; fair queueing lets it in after about one.
    assert trickle_ms < 0.25 * flood_ms[-1], (trickle_ms, flood_ms)
    stack.wait_idle()
