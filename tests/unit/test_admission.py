"""The synchronous admission core, driven with a manual clock."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import BASE_CONFIG, KEYS
from vllm_guard.config import parse_config
from vllm_guard.core.admission import Admission, Decision, TicketState


def _setup(config):
    inter, batch = config.classes
    return Admission(config.max_num_seqs, config.classes), inter, batch


def test_batch_never_takes_reserved_slot(config):
    adm, inter, batch = _setup(config)
    decisions = [adm.enter(batch, 0.0)[0] for _ in range(4)]
    assert decisions == [Decision.ADMITTED] * 3 + [Decision.QUEUED]
    # The reserved slot is still free: an interactive request gets it at once.
    assert adm.enter(inter, 0.0)[0] is Decision.ADMITTED
    assert adm.in_flight == 4


def test_strict_priority_on_release(config):
    adm, inter, batch = _setup(config)
    held = [adm.enter(inter, 0.0)[1] for _ in range(4)]
    _, queued_batch = adm.enter(batch, 1.0)
    _, queued_inter = adm.enter(inter, 2.0)  # arrives later but is more urgent
    admitted = adm.release(held[0], 3.0)
    assert admitted == [queued_inter]
    assert queued_batch.state is TicketState.WAITING
    # Batch may not use the freed slot while in_flight is at its limit (3 of 4).
    adm.release(held[1], 3.0)
    assert queued_batch.state is TicketState.WAITING
    assert adm.release(held[2], 3.0) == [queued_batch]


def test_queue_ahead_lets_interactive_wait_in_vllm_but_never_batch():
    config = parse_config(
        BASE_CONFIG.replace("queue_ahead: 0", "queue_ahead: 2"), "test.yaml", KEYS
    )
    adm, inter, batch = _setup(config)
    assert (inter.slot_limit, batch.slot_limit) == (4 + 2, 4 - 1)
    held = [adm.enter(inter, 0.0)[1] for _ in range(6)]  # 4 slots + 2 waiting in vLLM
    assert all(t.state is TicketState.ADMITTED for t in held)
    assert adm.enter(inter, 0.0)[0] is Decision.QUEUED
    _, queued_batch = adm.enter(batch, 0.0)
    # Freed slots go to the waiting interactive request first, and batch gets one only
    # once fewer than 3 requests are in vLLM: never a slot that vLLM would have to take
    # from the reserved one or from interactive requests waiting in it.
    for ticket in held[:4]:
        adm.release(ticket, 1.0)
    assert queued_batch.state is TicketState.WAITING
    assert adm.in_flight == 3
    assert adm.release(held[4], 1.0) == [queued_batch]


def test_fifo_within_class(config):
    adm, _inter, batch = _setup(config)
    held = [adm.enter(batch, 0.0)[1] for _ in range(3)]
    waiting = [adm.enter(batch, float(i))[1] for i in range(3)]
    order = []
    for h in held:
        order += adm.release(h, 10.0)
    assert order == waiting


def test_queue_full_is_refused_without_queueing(config):
    adm, _inter, batch = _setup(config)
    for _ in range(3):
        adm.enter(batch, 0.0)
    for _ in range(batch.max_queue):
        assert adm.enter(batch, 0.0)[0] is Decision.QUEUED
    assert adm.enter(batch, 0.0)[0] is Decision.QUEUE_FULL
    assert adm.statistics()[1].queued == batch.max_queue


def test_expiry_in_deadline_order(config):
    adm, inter, _batch = _setup(config)
    for _ in range(4):
        adm.enter(inter, 0.0)
    a = adm.enter(inter, 1.0)[1]
    b = adm.enter(inter, 2.0)[1]
    assert adm.next_deadline(inter) == 1.0 + inter.max_wait_s
    assert adm.expire(5.9) == []
    assert adm.expire(6.0) == [a]
    assert adm.next_deadline(inter) == b.deadline
    assert adm.expire(100.0) == [b]
    assert adm.next_deadline(inter) is None
    assert adm.statistics()[0].queued == 0


def test_cancelled_waiter_is_skipped_and_uncounted(config):
    adm, inter, _batch = _setup(config)
    held = [adm.enter(inter, 0.0)[1] for _ in range(4)]
    a = adm.enter(inter, 0.0)[1]
    b = adm.enter(inter, 0.0)[1]
    adm.cancel(a)
    assert adm.statistics()[0].queued == 1
    assert adm.release(held[0], 1.0) == [b]
    assert a.state is TicketState.CANCELLED


def test_cancelling_a_blocked_head_admits_the_waiters_behind_it(config):
    """A head needing 2 slots blocks its queue when 1 is free; once it is cancelled, the
    1-slot waiter behind it gets the free slot at once, not at the next release."""
    adm, inter, _batch = _setup(config)
    held = [adm.enter(inter, 0.0, "a")[1] for _ in range(4)]
    small = adm.enter(inter, 0.0, "a", cost=10)[1]
    big = adm.enter(inter, 0.0, "b", cost=1, seqs=2)[1]  # cheaper: the fair-queue head
    adm.release(held[0], 1.0)
    assert (small.state, big.state) == (TicketState.WAITING, TicketState.WAITING)
    assert adm.cancel(big) == [small]
    assert adm.in_flight == 4


def test_new_arrival_does_not_overtake_queued_peer(config):
    adm, inter, batch = _setup(config)
    held = [adm.enter(batch, 0.0)[1] for _ in range(3)]
    queued = adm.enter(batch, 0.0)[1]
    held.append(adm.enter(inter, 0.0)[1])  # takes the reserved slot
    adm.release(held[3], 1.0)  # the interactive slot frees; batch is still at its limit
    assert queued.state is TicketState.WAITING
    # A new batch arrival queues behind the waiting one rather than being admitted.
    assert adm.enter(batch, 1.0)[0] is Decision.QUEUED


def test_retry_after_grows_with_queue(config):
    adm, _inter, batch = _setup(config)
    held = [adm.enter(batch, 0.0)[1] for _ in range(3)]
    t = 0.0
    for h in held:  # completions every 0.5 s teach the estimator the service rate
        t += 0.5
        adm.release(h, t)
    short = adm.retry_after_s(batch)
    for _ in range(3):
        adm.enter(batch, t)
    for _ in range(4):
        adm.enter(batch, t)
    assert adm.retry_after_s(batch) > short


ops = st.lists(
    st.tuples(
        st.sampled_from(["enter_i", "enter_b", "release", "cancel", "expire"]),
        st.floats(min_value=0, max_value=3),
        st.integers(min_value=1, max_value=2),  # sequences (prompts x n) of the request
    ),
    max_size=200,
)


@pytest.mark.parametrize(("queue_ahead", "scheduler"), [(0, "vllm"), (2, "vllm"), (2, "guard")])
@settings(max_examples=300, deadline=None)
@given(seq=ops)
def test_invariants_under_any_interleaving(queue_ahead, scheduler, seq):
    """Slots never exceed their class limits, strict priority holds, nothing is lost:
    every ticket ends admitted, expired, refused or cancelled, and in-flight returns to 0.
    With queue_ahead q, up to q more interactive requests (never batch) may be in vLLM.
    A request of several sequences holds a slot for each. With the scheduler plugin batch
    may fill S + q, and interactive requests count only themselves against S + q."""
    config = parse_config(
        BASE_CONFIG.replace(
            "queue_ahead: 0",
            f"queue_ahead: {queue_ahead}, scheduler: {scheduler}, batch_queue_ahead: {queue_ahead}",
        ),
        "t.yaml",
        KEYS,
    )
    adm, inter, batch = _setup(config)
    plugin = scheduler == "guard"
    most = config.max_num_seqs + queue_ahead
    now = 0.0
    admitted, waiting, all_tickets = [], [], []
    for op, dt, seqs in seq:
        now += dt
        if op in ("enter_i", "enter_b"):
            tenant = "ab"[int(now * 10) % 2]  # two tenants share each class fairly
            cls = inter if op == "enter_i" else batch
            d, t = adm.enter(cls, now, tenant, 1 + now % 7, seqs=seqs)
            all_tickets.append(t)
            (
                admitted if d is Decision.ADMITTED else waiting if d is Decision.QUEUED else []
            ).append(t)
        elif op == "release" and admitted:
            t = admitted.pop(0)
            admitted += adm.release(t, now)
        elif op == "cancel" and waiting:
            admitted += adm.cancel(waiting[-1])
        elif op == "expire":  # then dispatch, as the gate does: an expired head may have
            adm.expire(now)  # been holding back smaller waiters behind it
            admitted += adm.dispatch()
        waiting = [t for t in waiting if t.state is TicketState.WAITING]
        stats = {s.name: s for s in adm.statistics()}
        assert adm.in_flight == sum(t.seqs for t in admitted) <= (2 * most if plugin else most)
        assert stats["interactive"].in_flight <= most
        if plugin:  # batch counts everything in vLLM, interactive only itself
            assert batch.slot_limit == most
            assert sum(t.seqs for t in admitted if t.priority_class is batch) <= most
        else:
            assert stats["batch"].in_flight <= batch.slot_limit == config.max_num_seqs - 1
        assert stats["interactive"].queued + stats["batch"].queued == len(waiting)
        # Strict priority: a batch request is never admitted while interactive ones wait
        # and the engine has free slots for the first of them.
        head = adm._by_rank[0].head()
        if head is not None:
            counted = stats["interactive"].in_flight if plugin else adm.in_flight
            assert counted + head.seqs > most
    while admitted:  # releasing admits the waiters, which are then released in turn
        admitted += adm.release(admitted.pop(0), now)
    assert adm.in_flight == 0
    assert all(s.in_flight == 0 and s.queued == 0 for s in adm.statistics())
    assert all(t.state is not TicketState.WAITING for t in all_tickets)


# -- weighted fair queueing within a class --------------------------------------------


def _fill(adm, batch, n=3):
    return [adm.enter(batch, 0.0, "holder")[1] for _ in range(n)]


def _turns(adm, held, n):
    """Release the oldest held ticket n times; the tenants admitted, in order."""
    order = []
    for _ in range(n):
        admitted = adm.release(held.pop(0), 1.0)
        held += admitted
        order += [t.tenant for t in admitted]
    return order


def _release_all(adm, held):
    """Release every held ticket at once; the tickets admitted in their place, in order."""
    admitted = []
    for ticket in held:
        admitted += adm.release(ticket, 2.0)
    return admitted


def _deep_queue(queueing="fair"):
    """The test config with room for 500 batch waiters."""
    text = BASE_CONFIG.replace(
        "batch: {vllm_priority: 10, max_queue: 5", "batch: {vllm_priority: 10, max_queue: 500"
    )
    return _setup(
        parse_config(text.replace("batch: {", f"batch: {{queueing: {queueing}, "), "t.yaml", KEYS)
    )


def test_a_tenant_behind_a_flood_waits_about_one_request():
    adm, _, batch = _deep_queue()
    held = _fill(adm, batch)
    flood = [adm.enter(batch, 0.0, "flood", cost=300)[1] for _ in range(100)]
    _, trickle = adm.enter(batch, 1.0, "trickle", cost=300)
    admitted = _release_all(adm, held)
    assert trickle in admitted  # among the first 3 admitted, not after 100
    assert admitted.index(trickle) <= 1
    assert [t for t in admitted if t is not trickle] == flood[: len(admitted) - 1]  # FIFO


def test_weights_share_slots_in_proportion_to_cost():
    adm, _, batch = _deep_queue()
    held = _fill(adm, batch)
    for _ in range(60):
        adm.enter(batch, 0.0, "heavy", cost=100, weight=2.0)
        adm.enter(batch, 0.0, "light", cost=100, weight=1.0)
    order = _turns(adm, held, 45)
    assert abs(order.count("heavy") - 2 * order.count("light")) <= 2


def test_cheap_requests_get_more_turns_than_expensive_ones():
    adm, _, batch = _deep_queue()
    held = _fill(adm, batch)
    for _ in range(40):
        adm.enter(batch, 0.0, "long", cost=1000)
    for _ in range(40):
        adm.enter(batch, 0.0, "short", cost=100)
    order = _turns(adm, held, 22)
    assert order.count("short") >= 8 * order.count("long")


def test_fifo_class_ignores_tenants():
    adm, _, batch = _deep_queue("fifo")
    held = _fill(adm, batch)
    flood = [adm.enter(batch, 0.0, "flood", cost=300)[1] for _ in range(4)]
    _, late = adm.enter(batch, 1.0, "trickle", cost=1)
    admitted = _release_all(adm, held)
    assert admitted == flood[:3] and late.state is TicketState.WAITING


# -- KV-cache headroom ---------------------------------------------------------------------

KV_CONFIG = BASE_CONFIG.replace(
    "engine: {max_num_seqs: 4,", "engine: {max_num_seqs: 4, kv_watermark: 0.8,"
).replace("reserved_seqs: 1,", "reserved_seqs: 1, reserved_kv: 0.2,")


def _kv_setup(capacity=1000):
    config = parse_config(KV_CONFIG, "test.yaml", KEYS)
    inter, batch = config.classes
    assert (inter.kv_fraction, batch.kv_fraction) == (0.8, 0.8 - 0.2)
    return Admission(config.max_num_seqs, config.classes, kv_capacity=capacity), inter, batch


def test_kv_headroom_admits_within_the_class_share_and_keeps_interactive_room():
    adm, inter, batch = _kv_setup()  # batch may fill 600 tokens, interactive 800
    first = adm.enter(batch, 0.0, kv=500)[1]
    assert first.state is TicketState.ADMITTED
    decision, second = adm.enter(batch, 0.0, kv=200)  # 700 > 600: waits though slots are free
    assert decision is Decision.QUEUED
    assert adm.enter(inter, 0.0, kv=300)[0] is Decision.ADMITTED  # 800 <= 800
    assert adm.kv.reserved == 800
    assert adm.kv_headroom(batch) == pytest.approx(-200)
    assert adm.release(first, 1.0) == [second]
    assert adm.kv.reserved == 500


def test_engine_usage_counts_where_it_exceeds_the_guards_reservations():
    adm, _inter, batch = _kv_setup()
    held = adm.enter(batch, 0.0, kv=100)[1]
    # Someone else's load: the engine reports 550 tokens in use, the guard holds 100.
    assert adm.engine_update(550, None, False) == []
    decision, waiting = adm.enter(batch, 0.0, kv=100)
    assert decision is Decision.QUEUED
    assert adm.engine_update(400, None, False) == [waiting]  # that load went away
    assert adm.kv.reserved == 200
    adm.release(held, 1.0)


def test_a_head_that_does_not_fit_blocks_smaller_waiters_until_it_expires():
    adm, _inter, batch = _kv_setup()
    held = adm.enter(batch, 0.0, kv=400)[1]
    big = adm.enter(batch, 0.0, kv=300)[1]
    small = adm.enter(batch, 1.0, kv=10)[1]
    assert (big.state, small.state) == (TicketState.WAITING, TicketState.WAITING)
    assert adm.expire(60.0) == [big]  # big's deadline (0 + 60 s) passed, small's not yet
    assert adm.dispatch() == [small]
    adm.release(held, 61.0)


def test_nothing_in_flight_admits_any_size_and_stale_hold_stops_batch_only():
    adm, inter, batch = _kv_setup()
    huge = adm.enter(batch, 0.0, kv=5000)[1]
    assert huge.state is TicketState.ADMITTED  # or it could never run
    adm.release(huge, 1.0)
    adm.engine_update(None, None, hold_batch=True)
    assert adm.enter(batch, 1.0, kv=1)[0] is Decision.QUEUED
    assert adm.enter(inter, 1.0, kv=1)[0] is Decision.ADMITTED
    assert len(adm.engine_update(None, None, hold_batch=False)) == 1


def test_unknown_capacity_means_slots_alone_decide():
    adm, _inter, batch = _kv_setup(capacity=None)
    assert all(adm.enter(batch, 0.0, kv=10**6)[0] is Decision.ADMITTED for _ in range(3))
    assert adm.kv_headroom(batch) == float("inf")
    adm.engine_update(10**7, 50, False)  # a capacity arrives; the reading now counts
    assert adm.kv.capacity == 50


# -- with the scheduler plugin (engine.scheduler: guard) -------------------------------

PLUGIN_CONFIG = KV_CONFIG.replace(
    "queue_ahead: 0", "queue_ahead: 2, scheduler: guard, batch_queue_ahead: 2"
)


def test_with_the_plugin_batch_fills_every_slot_and_interactive_still_gets_in():
    config = parse_config(PLUGIN_CONFIG, "test.yaml", KEYS)
    adm, inter, batch = _setup(config)
    # No reserved slot, and batch too may queue requests inside vLLM (batch_queue_ahead).
    assert (inter.slot_limit, batch.slot_limit) == (6, 6)
    default = parse_config(PLUGIN_CONFIG.replace(", batch_queue_ahead: 2", ""), "t.yaml", KEYS)
    assert default.classes[1].slot_limit == 4 + 4  # a whole wave of batch: S
    assert (inter.engine_makes_room, batch.engine_makes_room) == (True, False)
    held = [adm.enter(batch, 0.0)[1] for _ in range(6)]
    assert all(t.state is TicketState.ADMITTED for t in held)
    queued_batch = adm.enter(batch, 0.0)[1]
    assert queued_batch.state is TicketState.WAITING
    # Every slot is batch's, yet interactive requests are admitted: the engine preempts
    # batch for them. They count only themselves against their limit of 6.
    urgent = [adm.enter(inter, 0.0)[1] for _ in range(6)]
    assert all(t.state is TicketState.ADMITTED for t in urgent)
    decision, queued_inter = adm.enter(inter, 0.0)
    assert decision is Decision.QUEUED
    assert adm.release(urgent.pop(), 1.0) == [queued_inter]
    # Batch waits until everything in vLLM, interactive included, is below 6 again.
    for t in [*urgent, queued_inter]:
        adm.release(t, 1.0)
    assert queued_batch.state is TicketState.WAITING
    assert adm.release(held[0], 1.0) == [queued_batch]


def test_with_the_plugin_no_kv_share_is_held_back_and_interactive_counts_its_own():
    config = parse_config(PLUGIN_CONFIG, "test.yaml", KEYS)
    inter, batch = config.classes
    assert (inter.kv_fraction, batch.kv_fraction) == (0.8, 0.8)  # reserved_kv not applied
    assert (inter.kv_admission, batch.kv_admission) == (True, False)
    adm = Admission(config.max_num_seqs, config.classes, kv_capacity=1000)
    adm.engine_update(990, None, False)  # the cache is full of batch decodes
    # Batch is admitted by slots alone: vLLM preempts it for KV, as it would without us.
    assert all(adm.enter(batch, 0.0, kv=0)[0] is Decision.ADMITTED for _ in range(6))
    assert adm.enter(batch, 0.0, kv=0)[0] is Decision.QUEUED  # 6 = S + batch_queue_ahead
    assert adm.kv_headroom(inter) == 800  # batch's use does not count for interactive
    assert adm.enter(inter, 0.0, kv=500)[0] is Decision.ADMITTED
    assert adm.enter(inter, 0.0, kv=400)[0] is Decision.QUEUED  # 500 + 400 > 800 of its own


def test_without_the_plugin_the_same_file_keeps_its_reservations():
    config = parse_config(PLUGIN_CONFIG, "test.yaml", KEYS)
    fallback = config.with_scheduler("vllm", KEYS)
    inter, batch = fallback.classes
    assert fallback.engine.scheduler == "vllm"
    assert (inter.slot_limit, batch.slot_limit) == (6, 3)
    assert (inter.kv_fraction, batch.kv_fraction) == (0.8, pytest.approx(0.6))
    assert (inter.engine_makes_room, batch.kv_admission) == (False, True)


# -- several engines ------------------------------------------------------------------------


def test_tickets_spread_over_engines_by_free_slots(config):
    inter, batch = config.classes
    adm = Admission(config.max_num_seqs, config.classes, engines=2)  # S=4 each, 1 reserved
    held = [adm.enter(batch, 0.0)[1] for _ in range(6)]
    assert [t.engine for t in held] == [0, 1, 0, 1, 0, 1]
    assert adm.enter(batch, 0.0)[0] is Decision.QUEUED  # 3 batch slots on each engine
    admitted = adm.release(held[3], 1.0)  # a slot frees on engine 1: the waiter goes there
    assert len(admitted) == 1 and admitted[0].engine == 1
    assert adm.enter(inter, 0.0)[1].engine == 0  # the reserved slot, on each engine
    assert adm.enter(inter, 0.0)[1].engine == 1
    assert [e.in_flight for e in adm.engines] == [4, 4] and adm.in_flight == 8


def test_an_engine_taken_out_gets_nothing_until_it_is_back(config):
    _, batch = config.classes
    adm = Admission(config.max_num_seqs, config.classes, engines=2)
    assert adm.set_up(0, False) == []
    held = [adm.enter(batch, 0.0)[1] for _ in range(3)]
    assert {t.engine for t in held} == {1}
    decision, waiting = adm.enter(batch, 0.0)
    assert decision is Decision.QUEUED
    assert adm.set_up(0, True) == [waiting] and waiting.engine == 0
    for t in [*held, waiting]:
        adm.release(t, 1.0)
    assert [e.in_flight for e in adm.engines] == [0, 0]
    assert all(k == 0 for e in adm.engines for k in e.class_kv)


def test_kv_headroom_is_per_engine(config):
    _, batch = config.classes
    adm = Admission(config.max_num_seqs, config.classes, kv_capacity=1000, engines=2)
    adm.engine_update(800, None, False, engine=0)  # engine 0's cache is nearly full
    first = adm.enter(batch, 0.0, kv=300)[1]
    assert first.engine == 1
    second = adm.enter(batch, 0.0, kv=300)[1]
    assert second.engine == 1  # engine 0 still has too little room (900 - 800 < 300)
    assert adm.kv_headroom(batch) == pytest.approx(300)  # engine 1: 900 - 600


def test_a_ticket_goes_to_the_engine_it_prefers_while_that_one_has_room(config):
    _, batch = config.classes
    adm = Admission(config.max_num_seqs, config.classes, engines=2, affinity_slack=1)
    first = adm.enter(batch, 0.0, affinity=1)[1]
    assert first.engine == 1  # 3 free on both: its own engine
    second = adm.enter(batch, 0.0, affinity=1)[1]
    assert second.engine == 1  # 2 free there, 3 on engine 0: within the slack of 1
    third = adm.enter(batch, 0.0, affinity=1)[1]
    assert third.engine == 0  # 1 free there, 3 on engine 0: too crowded
    assert adm.enter(batch, 0.0)[1].engine == 0  # no preference: the roomiest


def test_a_reload_applies_new_class_limits_and_waiters_keep_their_deadlines(config):
    adm, _, batch = _setup(config)  # S=4, interactive reserves 1: batch has 3 slots
    held = [adm.enter(batch, 0.0)[1] for _ in range(3)]
    _, early = adm.enter(batch, 0.0)  # waits until 60 (batch max_wait_s)
    shorter = parse_config(
        BASE_CONFIG.replace("max_wait_s: 60", "max_wait_s: 10").replace(
            "reserved_seqs: 1", "reserved_seqs: 2"
        ),
        "test.yaml",
        KEYS,
    )
    new_inter, new_batch = shorter.classes
    assert adm.reconfigure(shorter.classes) == []
    _, late = adm.enter(new_batch, 5.0)  # arrives later, under the new wait: until 15
    assert adm.next_deadline(new_batch) == 15.0
    assert adm.expire(15.0) == [late]  # on time, though an older ticket waits longer
    assert early.state is TicketState.WAITING
    # Batch now has 2 slots: a release with 3 running admits nobody.
    assert adm.release(held[0], 16.0) == []
    assert adm.release(held[1], 16.0) == [early]
    assert adm.enter(new_inter, 16.0)[0] is Decision.ADMITTED  # interactive's 2 reserved


def test_a_reload_below_a_requests_sequences_refuses_it_at_once(config):
    """A request of n sequences fits its class when it arrives; a reload then lowers the
    class's slots below n. It could never be admitted: whether it already waits or enters
    just after the reload (it arrived under the old rules), it is answered TOO_LARGE at
    once, not left to wait out its max_wait_s."""
    adm, _, batch = _setup(config)  # S=4, interactive reserves 1: batch has 3 slots
    held = adm.enter(batch, 0.0)[1]
    _, waiting = adm.enter(batch, 0.0, seqs=3)  # fits the class, not the free slots
    assert waiting.state is TicketState.WAITING
    fewer = parse_config(
        BASE_CONFIG.replace("reserved_seqs: 1", "reserved_seqs: 2"), "test.yaml", KEYS
    )
    assert adm.reconfigure(fewer.classes) == [waiting]
    assert waiting.state is TicketState.TOO_LARGE
    assert adm.statistics()[1].queued == 0
    assert adm.max_seqs(batch) == 2  # the class as it is now, whatever object asks
    decision, late = adm.enter(batch, 1.0, seqs=3)  # `batch`: the rules it arrived under
    assert decision is Decision.TOO_LARGE and late.state is TicketState.TOO_LARGE
    assert adm.in_flight == 1
    assert adm.release(held, 2.0) == []
