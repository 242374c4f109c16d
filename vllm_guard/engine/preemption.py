"""Which running sequences the guard's vLLM scheduler preempts to make room for waiting
requests of the most urgent class: a pure decision, no vLLM import, tested on its own.

Runs in vLLM's engine process (`engine/scheduler.py` calls it once per step, before vLLM's
own scheduling). vLLM 0.32 never preempts a running request for a waiting one, whatever their
priorities; it stops at `max_num_seqs` or when the head of the waiting queue gets no KV
blocks. Here, when urgent requests wait, running requests of less urgent priorities are
preempted — the cheapest to recompute first (fewest computed tokens) — just enough to give
the urgent ones a slot and KV blocks in the same step:

- only requests with `priority <= urgent_max_priority` trigger it, and only requests with a
  larger priority are ever chosen: never a more urgent request for a less urgent one;
- at most `max_preemptions_per_step` per step;
- a request already preempted `max_preemptions_per_request` times is not chosen again, so
  batch work always finishes;
- an urgent request that cannot be made room for (too few candidates) preempts nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

POLICY_ENV = "VLLM_GUARD_SCHEDULER_POLICY"
"""How the policy reaches vLLM's engine process: JSON in the environment (the scheduler is
built there, not in the API server)."""


@dataclass(frozen=True)
class PreemptionPolicy:
    urgent_max_priority: int = 0
    """vLLM priorities at or below this are the most urgent class (the guard sends them)."""
    max_preemptions_per_step: int = 4
    max_preemptions_per_request: int = 3
    urgent_step_alone: bool = False
    """A step that schedules an urgent request's first tokens runs without the less urgent
    requests' decodes (they skip that one step), so its prefill does not share the step."""
    class_names: Mapping[str, str] = field(default_factory=dict)
    """vLLM priority (as a string) -> the guard's class name, for the plugin's metrics."""

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PreemptionPolicy:
        text = (os.environ if environ is None else environ).get(POLICY_ENV)
        return cls(**json.loads(text)) if text else cls()

    def class_name(self, priority: int) -> str:
        return self.class_names.get(str(priority)) or f"priority_{priority}"


class Seq(Protocol):
    """What the decision reads of a vLLM `Request`."""

    priority: int
    num_computed_tokens: int
    num_preemptions: int

    @property
    def num_tokens(self) -> int: ...


S = TypeVar("S", bound=Seq)


def choose_victims(
    waiting: Iterable[Seq],
    running: Sequence[S],
    free_slots: int,
    free_blocks: int,
    block_size: int,
    policy: PreemptionPolicy,
) -> list[S]:
    """The running requests to preempt before this step, in the order to preempt them.

    `waiting` in vLLM's queue order; `free_slots` = max_num_seqs - running; `free_blocks`
    the KV blocks free now. An urgent request is counted as needing one slot and the blocks
    for all its tokens (prefix-cache hits are not subtracted: a conservative guess)."""
    candidates = sorted(
        (
            r
            for r in running
            if r.priority > policy.urgent_max_priority
            and r.num_preemptions < policy.max_preemptions_per_request
        ),
        key=lambda r: (r.num_computed_tokens, -r.priority),
    )
    chosen: list[S] = []
    budget = policy.max_preemptions_per_step
    for request in waiting:
        if request.priority > policy.urgent_max_priority:
            break  # the queue is in priority order: no urgent request behind this one
        blocks = math.ceil(request.num_tokens / block_size)
        taken: list[S] = []
        slots, free = free_slots, free_blocks
        while (slots < 1 or free < blocks) and candidates and len(taken) < budget:
            victim = candidates.pop(0)
            taken.append(victim)
            slots += 1
            free += math.ceil(victim.num_computed_tokens / block_size)
        if slots < 1 or free < blocks:
            candidates[:0] = taken  # not enough to make room: preempt nothing for it
            break
        chosen += taken
        budget -= len(taken)
        free_slots, free_blocks = slots - 1, free - blocks
    return chosen
