"""A tenant's gate over the Redis store: waiting across replicas, the on_store_down
postures, the local share, and draining."""

from __future__ import annotations

import asyncio
import time

import pytest

from vllm_guard.core.quota import CONCURRENCY, TOKENS_MINUTE, Denied, Limits, Reservation
from vllm_guard.limits.shared_gate import SharedQuotaGate, split_limits
from vllm_guard.proxy.quota_gate import DRAINED, STORE_DOWN
from vllm_guard.testing.redis_server import RedisServer


def gate(store, limits, posture="local", replicas=3, **kw):
    return SharedQuotaGate(store, "acme", limits, posture, replicas, **kw)


async def test_a_waiter_is_admitted_when_another_replica_releases(stores):
    limits = Limits(max_concurrent=1)
    a, b = gate(stores[0], limits), gate(stores[1], limits)
    held = await a.reserve(0, max_wait_s=0)
    assert isinstance(held, Reservation)
    waiting = asyncio.create_task(b.reserve(0, max_wait_s=5))
    await asyncio.sleep(0.2)
    assert not waiting.done() and b.waiting == 1
    released = time.monotonic()
    a.settle(held, 0)
    got = await asyncio.wait_for(waiting, 2)
    assert isinstance(got, Reservation)
    assert time.monotonic() - released < 0.5  # the head asks again within POLL_S
    b.settle(got, 0)


async def test_waiters_keep_their_order_and_time_out_with_the_refusal(stores):
    limits = Limits(max_concurrent=1)
    a, b = gate(stores[0], limits), gate(stores[1], limits)
    held = await a.reserve(0, max_wait_s=0)
    assert isinstance(held, Reservation)
    first = asyncio.create_task(b.reserve(0, max_wait_s=5))
    late = asyncio.create_task(b.reserve(0, max_wait_s=0.3))
    timed_out = await asyncio.wait_for(late, 2)
    assert isinstance(timed_out, Denied) and timed_out.dimension == CONCURRENCY
    a.settle(held, 0)
    assert isinstance(await asyncio.wait_for(first, 2), Reservation)


async def test_a_cancelled_waiter_holds_nothing(stores):
    limits = Limits(max_concurrent=1)
    a, b = gate(stores[0], limits), gate(stores[1], limits)
    held = await a.reserve(0, max_wait_s=0)
    waiting = asyncio.create_task(b.reserve(0, max_wait_s=5))
    await asyncio.sleep(0.1)
    waiting.cancel()
    a.settle(held, 0)
    await asyncio.sleep(0.2)
    again = await a.reserve(0, max_wait_s=0)
    assert isinstance(again, Reservation)  # the cancelled waiter took no slot
    assert b.waiting == 0


async def test_store_down_rejects_or_falls_back_to_this_replicas_share(
    redis_server: RedisServer, stores
):
    rate, slots = Limits(requests_per_minute=30), Limits(max_concurrent=3)
    reject = gate(stores[0], rate, "reject")
    local, local_slots = gate(stores[0], rate, "local"), gate(stores[0], slots, "local")
    fallbacks: list[str] = []
    local.on_fallback = reject.on_fallback = fallbacks.append
    redis_server.stop()
    assert await reject.reserve(1, max_wait_s=0) is STORE_DOWN
    # local: 30 a minute across 3 replicas is 10 here; 3 concurrent is 1 here.
    granted = []
    while isinstance(got := await local.reserve(1, max_wait_s=0), Reservation):
        granted.append(got)
        assert len(granted) <= 10
    assert len(granted) == 10 and all(r.quota is not local for r in granted)
    assert local.snapshot().limit_requests == 10  # the headers say what this replica keeps
    first = await local_slots.reserve(1, max_wait_s=0)
    assert isinstance(first, Reservation)
    second = await local_slots.reserve(1, max_wait_s=0)
    assert isinstance(second, Denied) and second.dimension == CONCURRENCY
    local_slots.settle(first, 1)
    assert isinstance(await local_slots.reserve(1, max_wait_s=0), Reservation)
    assert fallbacks[:2] == ["reject", "local"]


def test_split_limits_divides_rates_capacities_and_concurrency():
    limits = Limits(
        requests_per_minute=90,
        tokens_per_minute=9000,
        max_concurrent=4,
        burst={"tokens_per_minute": 3000},
    )
    part = split_limits(limits, 3)
    assert part.requests_per_minute == 30
    assert part.tokens_per_minute == 3000
    assert part.burst == {"tokens_per_minute": 1000}
    assert part.max_concurrent == 1
    assert split_limits(Limits(max_concurrent=2), 3).max_concurrent == 1
    assert split_limits(limits, 1) is limits


async def test_drain_answers_waiters_and_new_requests(stores):
    limits = Limits(max_concurrent=1)
    a = gate(stores[0], limits)
    held = await a.reserve(0, max_wait_s=0)
    waiting = asyncio.create_task(a.reserve(0, max_wait_s=5))
    await asyncio.sleep(0.05)
    a.drain()
    assert await waiting is DRAINED
    assert await a.reserve(0, max_wait_s=5) is DRAINED
    a.settle(held, 0)


@pytest.mark.parametrize("posture", ["local", "reject"])
async def test_waiters_move_to_the_posture_when_redis_goes_away(
    redis_server: RedisServer, stores, posture
):
    limits = Limits(max_concurrent=1)
    a = gate(stores[0], limits, posture)
    held = await a.reserve(0, max_wait_s=0)
    waiting = asyncio.create_task(a.reserve(0, max_wait_s=5))
    await asyncio.sleep(0.1)
    redis_server.stop()
    if posture == "reject":
        assert await asyncio.wait_for(waiting, 2) is STORE_DOWN
        a.settle(held, 0)
    else:
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the local share (1) is taken by the running request
        a.settle(held, 0)  # kept for Redis's return; frees the local share
        got = await asyncio.wait_for(waiting, 2)
        assert isinstance(got, Reservation) and got.quota is not a
    assert stores[0].pending >= 1


async def test_an_outage_starts_from_the_shared_level_and_an_empty_redis_from_the_local_one(
    redis_server: RedisServer, stores
):
    limits = Limits(requests_per_minute=30)  # one request per 2 s
    g = gate(stores[0], limits, "local", replicas=3)
    for _ in range(27):
        assert isinstance(await g.reserve(1, max_wait_s=0), Reservation)
    redis_server.stop()
    # 3 left in Redis: this replica's share is 1, not a fresh 10.
    assert isinstance(await g.reserve(1, max_wait_s=0), Reservation)
    assert isinstance(await g.reserve(1, max_wait_s=0), Denied)
    redis_server.start()  # empty: every bucket it had is gone
    probing = asyncio.create_task(stores[0].run())
    try:
        while not stores[0].up:
            await asyncio.sleep(0.05)
        # Seeded with what this replica had left (≈0) x 3, not a full 30.
        refused = await g.reserve(1, max_wait_s=0)
        assert isinstance(refused, Denied) and refused.retry_after_s > 1
    finally:
        probing.cancel()


async def test_what_an_outage_served_locally_is_charged_to_redis_when_it_answers(
    redis_server: RedisServer, stores
):
    limits = Limits(requests_per_minute=30)
    g = gate(stores[0], limits, "local", replicas=3)
    for _ in range(15):
        assert isinstance(await g.reserve(1, max_wait_s=0), Reservation)
    redis_server.pause()  # keeps its data
    local = []
    while isinstance(got := await g.reserve(1, max_wait_s=0), Reservation):
        local.append(got)
    assert len(local) == 5  # 15 left in Redis: a third of it here
    for r in local:
        g.settle(r, 1)
    redis_server.resume()
    probing = asyncio.create_task(stores[0].run())
    try:
        while not stores[0].up or stores[0].pending:
            await asyncio.sleep(0.05)
        granted = 0
        while isinstance(await g.reserve(1, max_wait_s=0), Reservation):
            granted += 1
        assert granted == 10  # 30 - 15 - 5 (the outage's 5 were charged)
    finally:
        probing.cancel()


async def test_the_local_concurrency_share_counts_requests_already_running(
    redis_server: RedisServer, stores
):
    g = gate(stores[0], Limits(max_concurrent=3), "local", replicas=3)  # 1 here when down
    running = await g.reserve(0, max_wait_s=0)
    assert isinstance(running, Reservation)
    redis_server.stop()
    refused = await g.reserve(0, max_wait_s=0)
    assert isinstance(refused, Denied) and refused.dimension == CONCURRENCY
    g.settle(running, 0)
    assert isinstance(await g.reserve(0, max_wait_s=0), Reservation)


async def test_requests_running_when_redis_went_away_hold_back_the_local_refill(
    redis_server: RedisServer, stores
):
    # 1 a second, burst 3; one replica, so the local share is the whole limit.
    limits = Limits(requests_per_minute=60, burst={"requests_per_minute": 3})
    g = gate(stores[0], limits, "local", replicas=1)
    running = [await g.reserve(1, max_wait_s=0) for _ in range(3)]
    assert all(isinstance(r, Reservation) for r in running)
    redis_server.pause()
    refused = await g.reserve(1, max_wait_s=0)
    assert isinstance(refused, Denied)  # on local buckets now: nothing left
    await asyncio.sleep(2.5)
    # Redis held the 3 running requests back from refill; so do the local buckets: they
    # will complete inside this window, and the bucket promised B + r*t for it.
    assert isinstance(await g.reserve(1, max_wait_s=0), Denied)
    g.settle(running[0], 1)  # one ends: its share of refill is free again
    await asyncio.sleep(1.1)
    assert isinstance(await g.reserve(1, max_wait_s=0), Reservation)
    redis_server.resume()


async def test_a_local_request_still_running_when_redis_returns_is_charged_there_whole(
    redis_server: RedisServer, stores
):
    g = gate(stores[0], Limits(tokens_per_minute=600, max_concurrent=2), "local", replicas=1)
    redis_server.pause()
    running = [await g.reserve(100, max_wait_s=0) for _ in range(2)]  # two late answers
    assert all(isinstance(r, Reservation) and r.quota is not g for r in running)
    assert not stores[0].up
    redis_server.resume()
    probing = asyncio.create_task(stores[0].run())
    try:
        while not stores[0].up:
            await asyncio.sleep(0.05)
        # Taken into Redis before it counted as up: reserved there, with leases.
        reply = await stores[0].check(g.keys, 0)
        assert reply.levels[0] == pytest.approx(400, abs=5)
        assert reply.in_flight == 2  # so max_concurrent holds across the switch
        g.settle(running[0], 30)  # it used 30: the other 70 come back
        await asyncio.sleep(0.2)
        reply = await stores[0].check(g.keys, 0)
        assert reply.levels[0] == pytest.approx(470, abs=5) and reply.in_flight == 1
    finally:
        probing.cancel()


async def test_requests_waiting_on_local_buckets_wait_on_redis_once_it_is_back(
    redis_server: RedisServer, stores
):
    g = gate(stores[0], Limits(max_concurrent=3), "local", replicas=3)  # 1 here when down
    redis_server.stop()
    first = await g.reserve(0, max_wait_s=0)
    assert isinstance(first, Reservation) and first.quota is not g
    waiting = asyncio.create_task(g.reserve(0, max_wait_s=10))  # the local share is taken
    await asyncio.sleep(0.1)
    assert not waiting.done()
    redis_server.start()
    probing = asyncio.create_task(stores[0].run())
    try:
        # Redis is back: the local buckets admit nothing more; the waiter goes to Redis,
        # where 3 may run (the first is one of them now) — not to the local share later.
        second = await asyncio.wait_for(waiting, 3)
        assert isinstance(second, Reservation) and second.quota is g
        assert (await stores[0].check(g.keys, 0)).in_flight == 2
        g.settle(first, 0)
        g.settle(second, 0)
    finally:
        probing.cancel()


async def test_a_reload_changes_the_limits_and_running_requests_settle_where_charged(stores):
    """A reload drops the token limit and lowers the request one while a request runs: it
    settles on the dimensions it was charged on (its hold goes), new requests meet the new
    limits, and a waiter is asked again under them."""
    before = Limits(requests_per_minute=10, tokens_per_minute=1000)
    g = gate(stores[0], before, replicas=1)
    running = await g.reserve(400, max_wait_s=0)
    assert isinstance(running, Reservation)
    g.reconfigure(Limits(requests_per_minute=2), "reject")
    assert g.posture == "reject"
    assert isinstance(await g.reserve(0, max_wait_s=0), Reservation)
    # 2 per minute now, clipped so that the level and both holds fit: nothing left.
    refused = await g.reserve(0, max_wait_s=0)
    assert isinstance(refused, Denied) and refused.dimension == "requests_per_minute"
    g.settle(running, 100)
    await asyncio.sleep(0.2)  # the settle runs in the background
    store = stores[0]
    state = await store.client.hgetall("vllm-guard:{acme}:buckets")
    assert float(state[b"tokens_per_minute:r"]) == 0  # the dropped dimension's hold is gone
    assert float(state[b"tokens_per_minute:l"]) == pytest.approx(900, abs=5)


async def test_shadow_mode_over_redis_overdraws_would_be_delays(stores):
    """A shadow tenant in a waiting class: requests enforcement would delay are served at
    once and charged into debt in Redis (refill pays it off when the waits would have
    ended); in a rejecting class they are served uncharged, as refused ones would be."""
    from vllm_guard.core.quota import REQUESTS, TOKENS_MINUTE
    from vllm_guard.proxy.shadow import ShadowGate

    counted: list[str] = []
    limits = Limits(
        requests_per_minute=60, tokens_per_minute=6000, burst={"requests_per_minute": 1}
    )
    waits = ShadowGate(gate(stores[0], limits, replicas=1), counted.append, max_wait_s=30)
    held = [await waits.reserve(10, max_wait_s=30) for _ in range(4)]
    assert all(isinstance(r, Reservation) and r.id for r in held)  # all charged in Redis
    assert counted == [REQUESTS] * 3
    levels = dict(
        zip([d for d, _, _ in waits.inner.keys.dimensions], waits.inner._levels, strict=True)
    )
    assert levels[REQUESTS] == pytest.approx(-3, abs=0.1)  # three would-be waits, as debt
    # A top-up the tokens bucket could pay only later: overdrawn too, within max_wait_s.
    assert await waits.top_up(held[0], 5990) is True
    assert counted[-1] == TOKENS_MINUTE
    assert waits.inner._open[held[0].id] == 6000
    for r in held:
        waits.settle(r, 10)

    counted.clear()
    other = SharedQuotaGate(stores[1], "other", limits, "local", 1)
    rejects = ShadowGate(other, counted.append, max_wait_s=0)
    first, second = await rejects.reserve(10, 0), await rejects.reserve(10, 0)
    assert isinstance(first, Reservation) and first.id  # in Redis
    assert isinstance(second, Reservation) and second.quota is rejects  # served, uncharged
    assert counted == [REQUESTS]


async def test_a_reload_during_an_outage_releases_holds_only_where_they_were_taken(
    redis_server: RedisServer, stores
):
    """Redis is down, the local buckets hold back what the requests running through Redis
    reserved; a reload adds a token limit. When such a request ends, its hold is released
    from the buckets that took it — not from the new one, whose holds belong to the
    requests the local buckets admitted."""
    limits = Limits(requests_per_minute=60, burst={"requests_per_minute": 3})
    g = gate(stores[0], limits, "local", replicas=1)
    through_redis = await g.reserve(10, max_wait_s=0)
    assert isinstance(through_redis, Reservation)
    redis_server.pause()
    try:
        first = await g.reserve(1, max_wait_s=0)  # the outage is noticed: local buckets
        assert isinstance(first, Reservation) and first.quota is not g
        burst = {"requests_per_minute": 3.0}
        g.reconfigure(Limits(60, tokens_per_minute=1000, burst=burst), "local")
        local = await g.reserve(5, max_wait_s=0)
        assert isinstance(local, Reservation) and local.quota is not g
        tokens = g._local_quota.buckets[TOKENS_MINUTE]
        assert tokens.reserved == 5
        g.settle(through_redis, 10)
        assert tokens.reserved == 5  # the local request's hold stays
        g.settle(local, 5)
        g.settle(first, 1)
    finally:
        redis_server.resume()


async def test_shadow_mode_overdraws_the_local_buckets_while_redis_is_down(
    redis_server: RedisServer, stores
):
    """Redis cannot be reached, posture local: a shadow tenant's would-be delays are charged
    into debt on this replica's local buckets, as enforcement would have made them wait
    there, so the requests behind them see that debt; the ones still running when Redis
    answers again are taken into Redis like any request the local buckets admitted."""
    from vllm_guard.core.quota import REQUESTS
    from vllm_guard.proxy.shadow import ShadowGate

    counted: list[str] = []
    limits = Limits(requests_per_minute=60, burst={"requests_per_minute": 1})
    inner = gate(stores[0], limits, "local", replicas=1)
    shadow = ShadowGate(inner, counted.append, max_wait_s=30)
    redis_server.pause()
    held = [await shadow.reserve(1, max_wait_s=30) for _ in range(4)]
    assert counted == [REQUESTS] * 3
    assert all(isinstance(r, Reservation) and r.quota is inner._local_quota for r in held)
    bucket = inner._local_quota.buckets[REQUESTS]
    bucket.refill(asyncio.get_running_loop().time())
    assert bucket.level == pytest.approx(-3, abs=0.2)  # three would-be waits, as debt
    redis_server.resume()
    probing = asyncio.create_task(stores[0].run())
    try:
        while not stores[0].up or stores[0].pending:
            await asyncio.sleep(0.05)
        reply = await stores[0].check(inner.keys, 0)
        assert reply.in_flight == 4  # all four, with leases in Redis
        for r in held:
            shadow.settle(r, 1)
        await asyncio.sleep(0.2)
        assert (await stores[0].check(inner.keys, 0)).in_flight == 0
    finally:
        probing.cancel()
