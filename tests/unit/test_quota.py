"""Token buckets and tenant quotas on a manual clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_guard.core.quota import (
    CONCURRENCY,
    REQUESTS,
    TOKENS_DAY,
    TOKENS_MINUTE,
    Denied,
    Limits,
    Reservation,
    TenantQuota,
    TokenBucket,
    go_duration,
)

# One step of a random workload: wait, then try a request of `estimate` tokens that will
# really use `used_fraction` of it, and settle some of the open ones.
_step = st.tuples(
    st.floats(min_value=0, max_value=5, allow_nan=False),  # seconds to advance
    st.integers(min_value=1, max_value=400),  # estimated tokens
    st.floats(min_value=0, max_value=1),  # fraction of the estimate really used
    st.integers(min_value=0, max_value=3),  # open requests to settle now (oldest first)
)


@settings(max_examples=300, deadline=None)
@given(
    rpm=st.integers(min_value=1, max_value=120),
    tpm=st.integers(min_value=100, max_value=5000),
    burst=st.one_of(st.none(), st.integers(min_value=400, max_value=8000)),
    steps=st.lists(_step, min_size=1, max_size=120),
)
def test_no_window_lets_through_more_than_capacity_plus_rate_times_length(rpm, tpm, burst, steps):
    """Over every interval [a, b] the tokens of the requests admitted in it (counted as
    what they really used) and their number stay within capacity + rate * (b - a)."""
    limits = Limits(
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        burst={TOKENS_MINUTE: burst} if burst else None,
    )
    quota = TenantQuota(limits, now=0.0)
    token_cap = burst or tpm
    now = 0.0
    admitted: list[tuple[float, int]] = []  # (time, tokens really used)
    open_: list[tuple[Reservation, int]] = []
    for advance, estimate, fraction, n_settle in steps:
        now += advance
        for reservation, used in open_[:n_settle]:
            quota.settle(reservation, used, now)
        del open_[:n_settle]
        result = quota.try_reserve(estimate, now)
        if isinstance(result, Reservation):
            used = math.floor(estimate * fraction)
            admitted.append((now, used))
            open_.append((result, used))
        else:
            assert result.retry_after_s > 0 or result.dimension == CONCURRENCY
            if estimate > token_cap:
                assert result.retry_after_s == math.inf
    for i, (start, _) in enumerate(admitted):
        tokens = 0
        for requests, (end, used) in enumerate(admitted[i:], start=1):
            tokens += used
            span = end - start
            assert tokens <= token_cap + tpm / 60 * span + 1e-6
            assert requests <= rpm + rpm / 60 * span + 1e-6


@settings(max_examples=300, deadline=None)
@given(
    rpm=st.integers(min_value=1, max_value=120),
    tpm=st.integers(min_value=100, max_value=5000),
    steps=st.lists(_step, min_size=1, max_size=120),
)
def test_no_window_of_finished_requests_uses_more_than_capacity_plus_rate_times_length(
    rpm, tpm, steps
):
    """The engine's side of the promise: requests counted when they *finish* (settle),
    however long each ran, stay within capacity + rate * (b - a) over every interval."""
    quota = TenantQuota(Limits(requests_per_minute=rpm, tokens_per_minute=tpm), now=0.0)
    now = 0.0
    finished: list[tuple[float, int]] = []  # (time settled, tokens really used)
    open_: list[tuple[Reservation, int]] = []
    for advance, estimate, fraction, n_settle in steps:
        now += advance
        # Settle the newest first: long-running early requests finish late, the case where
        # counting at admission and counting at completion differ most.
        for reservation, used in open_[::-1][:n_settle]:
            quota.settle(reservation, used, now)
            finished.append((now, used))
        del open_[len(open_) - min(n_settle, len(open_)) :]
        result = quota.try_reserve(estimate, now)
        if isinstance(result, Reservation):
            open_.append((result, math.floor(estimate * fraction)))
    for i, (start, _) in enumerate(finished):
        tokens = 0
        for requests, (end, used) in enumerate(finished[i:], start=1):
            tokens += used
            span = end - start
            assert tokens <= tpm + tpm / 60 * span + 1e-6
            assert requests <= rpm + rpm / 60 * span + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(1, 300), st.floats(0, 2), st.booleans(), st.booleans()),
        min_size=1,
        max_size=80,
    )
)
def test_buckets_stay_within_zero_and_capacity_and_refusals_touch_nothing(ops):
    quota = TenantQuota(
        Limits(requests_per_minute=30, tokens_per_minute=600, tokens_per_day=2000), now=0.0
    )
    now = 0.0
    open_: list[Reservation] = []
    for estimate, advance, settle_one, sent in ops:
        now += advance
        for b in quota.buckets.values():
            b.refill(now)
        refilled = {d: b.level for d, b in quota.buckets.items()}
        result = quota.try_reserve(estimate, now)
        if isinstance(result, Denied):
            # All or nothing: a refusal charges no dimension.
            assert {d: b.level for d, b in quota.buckets.items()} == refilled
        else:
            open_.append(result)
            for d, b in quota.buckets.items():
                cost = 1 if d == REQUESTS else estimate
                assert b.level == pytest.approx(refilled[d] - cost)
        if settle_one and open_:
            r = open_.pop(0)
            quota.settle(r, r.tokens // 2, now, sent=sent)
        for b in quota.buckets.values():
            assert -1e-9 <= b.level <= b.capacity + 1e-9  # used <= estimate: never in debt
    assert quota.in_flight == len(open_)


def test_all_or_nothing_names_the_dimension_that_frees_last():
    quota = TenantQuota(Limits(requests_per_minute=60, tokens_per_minute=600), now=0.0)
    first = quota.try_reserve(590, 0.0)
    assert isinstance(first, Reservation)
    quota.settle(first, 590, 0.0)
    denied = quota.try_reserve(100, 0.0)
    assert isinstance(denied, Denied)
    assert denied.dimension == TOKENS_MINUTE
    assert denied.retry_after_s == pytest.approx((100 - 10) / 10)  # 10 tokens/s refill
    assert quota.buckets[REQUESTS].level == pytest.approx(59)  # the refusal took no request
    assert isinstance(quota.try_reserve(100, 8.9), Denied)
    assert isinstance(quota.try_reserve(100, 9.0), Reservation)


def test_settle_refunds_unused_and_charges_overrun_as_debt():
    quota = TenantQuota(Limits(tokens_per_minute=600), now=0.0)
    r = quota.try_reserve(500, 0.0)
    assert isinstance(r, Reservation)
    quota.settle(r, 100, 0.0)
    assert quota.buckets[TOKENS_MINUTE].level == pytest.approx(500)
    quota.settle(r, 100, 0.0)  # twice is once
    assert quota.buckets[TOKENS_MINUTE].level == pytest.approx(500)
    r2 = quota.try_reserve(500, 0.0)
    assert isinstance(r2, Reservation)
    quota.settle(r2, 900, 0.0)  # the estimate was 400 short: the bucket owes 400
    assert quota.buckets[TOKENS_MINUTE].level == pytest.approx(-400)
    denied = quota.try_reserve(1, 0.0)
    assert isinstance(denied, Denied)
    assert denied.retry_after_s == pytest.approx(401 / 10)


def test_unsent_request_is_refunded_entirely():
    quota = TenantQuota(Limits(requests_per_minute=2, tokens_per_day=1000), now=0.0)
    r = quota.try_reserve(300, 0.0)
    assert isinstance(r, Reservation)
    quota.settle(r, 0, 1.0, sent=False)
    assert quota.buckets[REQUESTS].level == pytest.approx(2)
    assert quota.buckets[TOKENS_DAY].level == pytest.approx(1000)


def test_top_up_adds_to_every_token_bucket_or_to_none():
    quota = TenantQuota(
        Limits(requests_per_minute=60, tokens_per_minute=600, tokens_per_day=700), now=0.0
    )
    r = quota.try_reserve(300, 0.0)
    assert isinstance(r, Reservation)
    assert quota.top_up(r, 250, 0.0)
    assert r.tokens == 550
    assert quota.buckets[TOKENS_MINUTE].level == pytest.approx(50)
    assert quota.buckets[TOKENS_DAY].level == pytest.approx(150)
    assert quota.buckets[REQUESTS].level == pytest.approx(59)  # still one request
    assert not quota.top_up(r, 100, 0.0)  # the minute bucket cannot pay: neither pays
    assert quota.buckets[TOKENS_DAY].level == pytest.approx(150)
    quota.settle(r, 0, 0.0, sent=False)  # the whole topped-up hold comes back
    assert quota.buckets[TOKENS_MINUTE].level == pytest.approx(600)
    assert quota.buckets[TOKENS_DAY].level == pytest.approx(700)
    assert quota.in_flight == 0


def test_concurrency_cap_counts_open_reservations():
    quota = TenantQuota(Limits(max_concurrent=2), now=0.0)
    a, b = quota.try_reserve(1, 0.0), quota.try_reserve(1, 0.0)
    denied = quota.try_reserve(1, 0.0)
    assert isinstance(denied, Denied) and denied.dimension == CONCURRENCY
    assert isinstance(a, Reservation) and isinstance(b, Reservation)
    quota.settle(a, 1, 0.0)
    assert isinstance(quota.try_reserve(1, 0.0), Reservation)


def test_snapshot_for_headers():
    quota = TenantQuota(Limits(requests_per_minute=120, tokens_per_minute=6000), now=0.0)
    quota.try_reserve(3000, 0.0)
    snap = quota.snapshot(0.0)
    assert snap.remaining_requests == 119
    assert snap.reset_requests_s == pytest.approx(0.5)
    assert snap.remaining_tokens == 3000
    assert snap.reset_tokens_s == pytest.approx(30)


def test_bucket_wait_is_exact_refill_time():
    b = TokenBucket(capacity=100, rate=2, now=0.0)
    b.reserve(100, 0.0)
    b.settle(100, 100, 0.0)
    assert b.wait_s(10, 1.0) == pytest.approx(4.0)
    assert b.wait_s(101, 1.0) == math.inf


def test_open_reservations_hold_back_refill():
    b = TokenBucket(capacity=100, rate=10, now=0.0)
    b.reserve(60, 0.0)
    assert b.wait_s(50, 100.0) == pytest.approx(1.0)  # refill stopped at 100 - 60 held
    assert b.level == pytest.approx(40)
    b.settle(60, 20, 100.0)  # 40 unused comes back; 20 is gone for good
    assert b.level == pytest.approx(80)
    assert b.reset_s(100.0) == pytest.approx(2.0)
    b.reserve(80, 100.0)
    assert b.reset_s(100.0) == pytest.approx(10.0)  # if the 80 held comes back unused


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0004, "1ms"), (0.12, "120ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_go_durations_like_openai(seconds, text):
    assert go_duration(seconds) == text


def test_a_changed_limit_clips_the_bucket_and_never_refills_it():
    bucket = TokenBucket(600, 10, now=0.0)
    bucket.reserve(100, 0.0)
    # Lower: clipped so that the level and the open reservation fit the new capacity (the
    # promise at completion: what runs now counts against it).
    bucket.set_limit(300, 5, now=0.0)
    assert (bucket.capacity, bucket.rate, bucket.level) == (300, 5, 200)
    assert bucket.reserved == 100  # the open reservation stays
    bucket.set_limit(1000, 20, now=0.0)  # higher: not refilled by the change
    assert bucket.level == 200
    bucket.set_limit(50, 1, now=0.0)  # below what is held: in debt until it is settled
    assert bucket.level == -50
    bucket.settle(100, 100, now=0.0)
    assert (bucket.level, bucket.reserved) == (-50, 0)
    bucket.clip(120)
    assert bucket.level == -50
    bucket.set_limit(300, 5, now=0.0)
    bucket.refill(now=34.0)  # 5/s pays the debt off, then fills
    assert bucket.level == 120
    bucket.clip(120)
    assert bucket.level == 120
    bucket.clip(500)  # clipping never raises the level
    assert bucket.level == 120
