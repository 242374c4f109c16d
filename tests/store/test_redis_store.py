"""The Redis quota store against a real Redis: shared buckets, all-or-nothing reserves,
settles, ids, leases, and what a missing Redis does."""

from __future__ import annotations

import asyncio
import time

import pytest

from vllm_guard.core.quota import CONCURRENCY, REQUESTS, TOKENS_MINUTE, Limits
from vllm_guard.limits.redis_store import RedisQuotaStore, StoreDown
from vllm_guard.testing.redis_server import RedisServer

LIMITS = Limits(requests_per_minute=10, tokens_per_minute=1000, max_concurrent=100)


async def test_replicas_share_one_bucket(stores):
    keys = [s.keys_for("acme", LIMITS) for s in stores]
    granted = 0
    for i in range(30):  # three replicas in turn, each sure of the full limit on its own
        store = stores[i % 3]
        reply = await store.reserve(keys[i % 3], store.new_id(), 1)
        granted += reply.granted
    assert granted == 10
    refused = await stores[0].reserve(keys[0], stores[0].new_id(), 1)
    assert refused.denied is not None and refused.denied.dimension == REQUESTS
    assert 5.0 < refused.denied.retry_after_s <= 6.0  # one request per 6 s


async def test_reserve_is_all_or_nothing(stores):
    store = stores[0]
    keys = store.keys_for("acme", LIMITS)
    assert (await store.reserve(keys, store.new_id(), 900)).granted
    reply = await store.reserve(keys, store.new_id(), 200)  # requests can pay, tokens not
    assert not reply.granted
    assert reply.denied is not None and reply.denied.dimension == TOKENS_MINUTE
    levels = dict(zip([d for d, _, _ in keys.dimensions], reply.levels, strict=True))
    assert levels[REQUESTS] == pytest.approx(9, abs=0.01)  # untouched by the refusal
    assert reply.in_flight == 1


async def test_settle_returns_what_was_not_used_and_a_refund_returns_the_request(stores):
    store = stores[0]
    keys = store.keys_for("acme", LIMITS)
    used_id, refund_id = store.new_id(), store.new_id()
    await store.reserve(keys, used_id, 500)
    await store.reserve(keys, refund_id, 300)
    await store.settle(keys, used_id, 120, sent=True)
    await store.settle(keys, refund_id, 0, sent=False)
    await store.settle(keys, refund_id, 0, sent=False)  # twice: the second finds nothing
    reply = await store.check(keys, 0)
    levels = dict(zip([d for d, _, _ in keys.dimensions], reply.levels, strict=True))
    assert levels[TOKENS_MINUTE] == pytest.approx(880, abs=2)
    assert levels[REQUESTS] == pytest.approx(9, abs=0.01)
    assert reply.in_flight == 0


async def test_a_retried_reserve_is_charged_once(stores):
    store = stores[0]
    keys = store.keys_for("acme", LIMITS)
    rid = store.new_id()
    assert (await store.reserve(keys, rid, 100)).granted
    again = await store.reserve(keys, rid, 100)
    assert again.granted and again.in_flight == 1
    levels = dict(zip([d for d, _, _ in keys.dimensions], again.levels, strict=True))
    assert levels[TOKENS_MINUTE] == pytest.approx(900, abs=2)


async def test_top_up_pays_on_every_token_bucket_or_none(stores):
    store = stores[0]
    limits = Limits(tokens_per_minute=1000, tokens_per_day=1200)
    keys = store.keys_for("acme", limits)
    rid = store.new_id()
    await store.reserve(keys, rid, 500)
    assert (await store.top_up(keys, rid, 400)).granted
    refused = await store.top_up(keys, rid, 400)  # the day bucket has 300 left
    assert not refused.granted and refused.denied is not None
    await store.settle(keys, rid, 900, sent=True)
    reply = await store.check(keys, 0)
    assert reply.levels[1] == pytest.approx(300, abs=2)


async def test_a_dead_replicas_concurrency_expires_charged_in_full(redis_url):
    limits = Limits(tokens_per_minute=1000, max_concurrent=1)
    dead = RedisQuotaStore(redis_url, lease_s=1.0)
    alive = RedisQuotaStore(redis_url, lease_s=1.0)
    try:
        keys = dead.keys_for("acme", limits)
        assert (await dead.reserve(keys, dead.new_id(), 400)).granted
        # `dead` never renews (its loop does not run): a crashed guard.
        refused = await alive.reserve(keys, alive.new_id(), 100)
        assert refused.denied is not None and refused.denied.dimension == CONCURRENCY
        await asyncio.sleep(1.2)
        reply = await alive.reserve(keys, alive.new_id(), 100)
        assert reply.granted and reply.in_flight == 1
        # The dead replica's 400 stay charged: 1000 - 400 - 100 (+ a little refill).
        assert reply.levels[0] == pytest.approx(500, abs=30)
    finally:
        await dead.close()
        await alive.close()


async def test_a_live_replica_renews_its_leases(redis_url):
    limits = Limits(max_concurrent=1)
    holder = RedisQuotaStore(redis_url, lease_s=1.0)
    other = RedisQuotaStore(redis_url, lease_s=1.0)
    renewing = asyncio.create_task(holder.run())
    try:
        keys = holder.keys_for("acme", limits)
        rid = holder.new_id()
        assert (await holder.reserve(keys, rid, 0)).granted
        await asyncio.sleep(2.0)  # twice the lease
        assert not (await other.reserve(keys, other.new_id(), 0)).granted
        await holder.settle(keys, rid, 0, sent=True)
        assert (await other.reserve(keys, other.new_id(), 0)).granted
    finally:
        renewing.cancel()
        await holder.close()
        await other.close()


async def test_a_stopped_redis_is_noticed_at_once_and_a_paused_one_within_the_timeout(
    redis_server: RedisServer, redis_url
):
    store = RedisQuotaStore(redis_url, timeout_s=0.1)
    keys = store.keys_for("acme", LIMITS)
    try:
        assert (await store.reserve(keys, store.new_id(), 1)).granted
        redis_server.pause()  # accepts connections, answers nothing
        started = time.monotonic()
        with pytest.raises(StoreDown):
            await store.reserve(keys, store.new_id(), 1)
        assert time.monotonic() - started < 0.3
        assert store.up  # one late answer fails its own request only
        with pytest.raises(StoreDown):
            await store.reserve(keys, store.new_id(), 1)
        assert time.monotonic() - started < 0.5
        assert not store.up  # two in a row: down
        with pytest.raises(StoreDown):  # while down: no Redis call at all
            await store.reserve(keys, store.new_id(), 1)
    finally:
        redis_server.resume()
        await store.close()


async def test_after_redis_returns_the_unanswered_reserve_is_refunded_and_settles_sent(
    redis_server: RedisServer, redis_url
):
    store = RedisQuotaStore(redis_url, timeout_s=0.1)
    keys = store.keys_for("acme", LIMITS)
    probing = asyncio.create_task(store.run())
    try:
        done_id = store.new_id()
        assert (await store.reserve(keys, done_id, 100)).granted
        redis_server.pause()
        for _ in range(2):  # Redis runs them when it wakes: charged, then refunded
            with pytest.raises(StoreDown):
                await store.reserve(keys, store.new_id(), 100)
        assert not store.up
        await store.settle(keys, done_id, 40, sent=True)  # kept until Redis answers
        assert store.pending == 3
        redis_server.resume()
        started = time.monotonic()
        while not store.up or store.pending:
            assert time.monotonic() - started < 3, "not back within 3 s"
            await asyncio.sleep(0.05)
        reply = await store.check(keys, 0)
        assert reply.in_flight == 0
        levels = dict(zip([d for d, _, _ in keys.dimensions], reply.levels, strict=True))
        assert levels[TOKENS_MINUTE] == pytest.approx(960, abs=5)
        assert levels[REQUESTS] == pytest.approx(9, abs=0.05)
    finally:
        probing.cancel()
        await store.close()


async def test_a_restarted_redis_is_found_again(redis_server: RedisServer, redis_url):
    store = RedisQuotaStore(redis_url, timeout_s=0.1)
    keys = store.keys_for("acme", LIMITS)
    probing = asyncio.create_task(store.run())
    try:
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(StoreDown):
            await store.reserve(keys, store.new_id(), 1)
        assert time.monotonic() - started < 0.15  # connection refused: at once
        redis_server.start()
        while not store.up:
            assert time.monotonic() - started < 3
            await asyncio.sleep(0.05)
        assert (await store.reserve(keys, store.new_id(), 1)).granted
    finally:
        probing.cancel()
        await store.close()


async def test_password_is_required_and_used(redis_url):
    with RedisServer(password="s3cret-pw") as server:
        anonymous = RedisQuotaStore(server.url)
        keys = anonymous.keys_for("acme", LIMITS)
        with pytest.raises(StoreDown):
            await anonymous.reserve(keys, anonymous.new_id(), 1)
        await anonymous.close()
        authed = RedisQuotaStore(server.url, password="s3cret-pw")
        assert (await authed.reserve(keys, authed.new_id(), 1)).granted
        await authed.close()


async def test_tls_with_a_private_ca():
    with RedisServer(tls=True) as server:
        assert server.url.startswith("rediss://")
        trusting = RedisQuotaStore(server.url, ca_file=server.ca_file, timeout_s=1.0)
        keys = trusting.keys_for("acme", LIMITS)
        assert (await trusting.reserve(keys, trusting.new_id(), 1)).granted
        await trusting.close()
        # Without the CA the server's certificate does not verify: no quota store.
        doubting = RedisQuotaStore(server.url, timeout_s=1.0)
        with pytest.raises(StoreDown):
            await doubting.reserve(keys, doubting.new_id(), 1)
        await doubting.close()


def _state(redis_url: str, tenant: str = "acme") -> dict[str, float]:
    import redis as sync_redis

    raw = sync_redis.Redis.from_url(redis_url).hgetall(f"vllm-guard:{{{tenant}}}:buckets")
    return {k.decode(): float(v) for k, v in raw.items()}


async def test_replicas_with_different_limits_never_corrupt_each_others_buckets(stores, redis_url):
    """Mid-rollout (or mid-reload) replicas pass different limits for one tenant: each
    reservation is settled on exactly the buckets it was charged on, so no hold is left
    behind and nothing is refunded that was never charged."""
    with_tokens = Limits(requests_per_minute=10, tokens_per_minute=1000)
    requests_only = Limits(requests_per_minute=20)
    a, b = stores[0], stores[1]
    keys_a, keys_b = a.keys_for("acme", with_tokens), b.keys_for("acme", requests_only)
    ra, rb = a.new_id(), b.new_id()
    assert (await a.reserve(keys_a, ra, 300)).granted
    assert (await b.reserve(keys_b, rb, 0)).granted
    # Each settles the other's way: A's request under B's limits (a reload dropped the
    # token limit), B's under A's (a reload added it).
    await a.settle(keys_b, ra, 100, sent=True)
    await b.settle(keys_a, rb, 0, sent=True)
    state = _state(redis_url)
    assert state[f"{TOKENS_MINUTE}:r"] == 0  # A's hold went back...
    assert state[f"{TOKENS_MINUTE}:l"] == pytest.approx(900, abs=2)  # ...and it paid 100
    assert state[f"{REQUESTS}:r"] == 0
    # B's request was never charged tokens: settling it under A's limits refunded none.
    reply = await a.check(keys_a, 0)
    levels = dict(zip([d for d, _, _ in keys_a.dimensions], reply.levels, strict=True))
    assert levels[TOKENS_MINUTE] == pytest.approx(900, abs=2)
    assert reply.in_flight == 0


async def test_a_dead_replicas_lease_expires_on_its_own_dimensions(redis_url):
    dead = RedisQuotaStore(redis_url, lease_s=1.0)
    other = RedisQuotaStore(redis_url, lease_s=1.0)
    try:
        with_tokens = Limits(tokens_per_minute=1000, max_concurrent=5)
        rid = dead.new_id()
        assert (await dead.reserve(dead.keys_for("acme", with_tokens), rid, 400)).granted
        await asyncio.sleep(1.5)  # the lease runs out; the other replica has no token limit
        requests_only = other.keys_for("acme", Limits(requests_per_minute=10, max_concurrent=5))
        assert (await other.check(requests_only, 0)).in_flight == 0
        state = _state(redis_url)
        assert state[f"{TOKENS_MINUTE}:r"] == 0  # its hold is gone: charged whole
        assert state[f"{TOKENS_MINUTE}:l"] == pytest.approx(600, abs=30)
    finally:
        await dead.close()
        await other.close()


async def test_a_top_up_under_other_limits_asks_for_a_new_reservation(stores):
    store = stores[0]
    old, new = (
        store.keys_for("acme", Limits(tokens_per_minute=1000)),
        store.keys_for("acme", Limits(tokens_per_minute=1000, tokens_per_day=50_000)),
    )
    rid = store.new_id()
    assert (await store.reserve(old, rid, 100)).granted
    reply = await store.top_up(new, rid, 50)
    assert not reply.granted and reply.denied is None  # as for an expired one
    assert (await store.top_up(old, rid, 50)).granted
