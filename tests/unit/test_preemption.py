"""The scheduler plugin's decision (engine/preemption.py) on plain objects: who is preempted
for which waiting request. The plugin in vLLM's own scheduler: test_scheduler_plugin.py."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_guard.engine.preemption import PreemptionPolicy, choose_victims

BLOCK = 16
POLICY = PreemptionPolicy(urgent_max_priority=0, max_preemptions_per_step=4)


@dataclass(eq=False)
class Seq:
    priority: int
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    num_tokens: int = 16

    def __repr__(self) -> str:
        return f"Seq(p={self.priority}, computed={self.num_computed_tokens})"


def test_a_waiting_urgent_request_takes_the_cheapest_batch_sequence_slot():
    running = [Seq(10, 300), Seq(10, 40), Seq(20, 900), Seq(10, 41)]
    victims = choose_victims([Seq(0)], running, 0, 100, BLOCK, POLICY)
    assert victims == [running[1]]  # fewest computed tokens: cheapest to recompute


def test_nothing_urgent_waiting_or_free_room_preempts_nothing():
    running = [Seq(10, 300)]
    assert choose_victims([Seq(10)], running, 0, 100, BLOCK, POLICY) == []
    assert choose_victims([], running, 0, 100, BLOCK, POLICY) == []
    assert choose_victims([Seq(0)], running, 1, 100, BLOCK, POLICY) == []  # a slot is free


def test_a_more_urgent_request_is_never_preempted_for_a_less_urgent_one():
    running = [Seq(0, 5), Seq(0, 7)]
    assert choose_victims([Seq(0)], running, 0, 100, BLOCK, POLICY) == []


def test_preemptions_per_step_are_capped():
    running = [Seq(10, i) for i in range(8)]
    victims = choose_victims([Seq(0) for _ in range(6)], running, 0, 1000, BLOCK, POLICY)
    assert victims == running[:4]


def test_a_sequence_preempted_often_enough_is_not_chosen_again():
    running = [Seq(10, 1, num_preemptions=3), Seq(10, 50, num_preemptions=2)]
    assert choose_victims([Seq(0)], running, 0, 100, BLOCK, POLICY) == [running[1]]
    assert choose_victims([Seq(0)], running[:1], 0, 100, BLOCK, POLICY) == []


def test_kv_blocks_are_made_room_for_too():
    # A slot is free, but the urgent request needs 4 blocks and 1 is free: victims until
    # their computed tokens free enough (each of these holds 2 blocks).
    running = [Seq(10, 32), Seq(10, 32), Seq(10, 500)]
    urgent = Seq(0, num_tokens=64)
    victims = choose_victims([urgent], running, 1, 1, BLOCK, POLICY)
    assert victims == running[:2]


def test_an_urgent_request_that_cannot_be_made_room_for_preempts_nothing():
    running = [Seq(10, 16)]  # frees 1 block; 10 are needed
    assert choose_victims([Seq(0, num_tokens=160)], running, 0, 0, BLOCK, POLICY) == []


seqs = st.builds(
    Seq,
    priority=st.sampled_from([0, 0, 10, 20]),
    num_computed_tokens=st.integers(0, 400),
    num_preemptions=st.integers(0, 4),
    num_tokens=st.integers(1, 400),
)


@settings(max_examples=300, deadline=None)
@given(
    waiting=st.lists(seqs, max_size=8),
    running=st.lists(seqs, max_size=12),
    free_slots=st.integers(0, 3),
    free_blocks=st.integers(0, 40),
    cap=st.integers(0, 5),
)
def test_victims_are_always_less_urgent_within_caps_and_only_for_urgent_waiters(
    waiting, running, free_slots, free_blocks, cap
):
    policy = PreemptionPolicy(0, cap, 3)
    waiting = sorted(waiting, key=lambda s: s.priority)  # vLLM's queue order
    victims = choose_victims(waiting, running, free_slots, free_blocks, BLOCK, policy)
    assert len(victims) <= cap
    assert len({id(v) for v in victims}) == len(victims)
    assert all(any(v is r for r in running) for v in victims)
    assert all(v.priority > 0 and v.num_preemptions < 3 for v in victims)
    if not any(w.priority <= 0 for w in waiting):
        assert victims == []


def test_the_policy_reaches_the_engine_process_through_the_environment():
    policy = PreemptionPolicy(urgent_max_priority=5, max_preemptions_per_step=2)
    env = {"VLLM_GUARD_SCHEDULER_POLICY": policy.to_env()}
    assert PreemptionPolicy.from_env(env) == policy
    assert PreemptionPolicy.from_env({}) == PreemptionPolicy()
