"""Tenants do not share vLLM's prefix cache (the guard's cache_salt), on the real engine:
a tenant's repeated prompt hits its own cached blocks, the same prompt from another tenant
hits none of them — so no tenant can time whether another sent it."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox jumps over the lazy dog. " * 60  # several cached blocks


def _hits(stack) -> float:
    return stack.vllm_metric("vllm:prefix_cache_hits_total")


def _send(stack, key: str) -> None:
    stack.client(key).completions.create(model="tiny", prompt=PROMPT, max_tokens=1)


def test_a_tenant_never_hits_another_tenants_cached_prefix(stack):
    _send(stack, "CHAT_UI_KEY")
    before = _hits(stack)
    _send(stack, "CHAT_UI_KEY")  # the same tenant again: its blocks are cached
    own = _hits(stack) - before
    assert own > 0
    before = _hits(stack)
    _send(stack, "COUNTED_KEY")  # another tenant, the same prompt
    assert _hits(stack) - before == 0
    before = _hits(stack)
    _send(stack, "COUNTED_KEY")  # ... which then has a cache of its own
    assert _hits(stack) - before == own
