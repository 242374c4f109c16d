"""The guard's scheduler for vLLM: load it with `--scheduler-cls
vllm_guard.engine.scheduler.GuardScheduler` (or `GuardAsyncScheduler` where vLLM runs async
scheduling, as it does on GPU hosts; the CPU build turns it off).

Runs in vLLM's engine-core process and imports only vLLM and `engine/preemption.py`. Before
each of vLLM's own scheduling steps it preempts, for the most urgent waiting requests, the
running requests `preemption.choose_victims` picks — the same way vLLM's own
`reset_prefix_cache(reset_running_requests=True)` takes requests out of `running` outside
`schedule()` — so vLLM's priority queue then schedules the urgent requests first, in the same
step. Written against vLLM 0.32's `Scheduler`; on another version it refuses to load.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import vllm
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_guard.engine.preemption import PreemptionPolicy, choose_victims

SUPPORTED_VLLM = "0.32."
log = logging.getLogger("vllm_guard.engine.scheduler")


def check_vllm_version(version: str = vllm.__version__) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm_guard's scheduler is written against vLLM {SUPPORTED_VLLM}x internals and "
            f"refuses to run on vLLM {version}; run with engine.scheduler: vllm"
        )


class _MakesRoomForUrgent:
    """The behaviour both schedulers share; mixed in before vLLM's class."""

    guard_policy: PreemptionPolicy
    guard_preemptions = 0
    """Preemptions this scheduler made (vLLM's own KV preemptions not counted)."""

    def _init_guard(self) -> None:
        check_vllm_version()
        self.guard_policy = PreemptionPolicy.from_env()
        log.info("vllm-guard scheduler: %s", self.guard_policy)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        self._make_room_for_urgent()
        return super().schedule(*args, **kwargs)  # type: ignore[misc]

    def _make_room_for_urgent(self) -> None:
        sched: Any = self
        policy = self.guard_policy
        waiting = sched.waiting
        if not waiting or waiting.peek_request().priority > policy.urgent_max_priority:
            return  # the common case: nothing urgent waits
        block_pool = sched.kv_cache_manager.block_pool
        victims = choose_victims(
            waiting,
            sched.running,
            sched.max_num_running_reqs - len(sched.running),
            block_pool.get_num_free_blocks(),
            sched.block_size,
            policy,
        )
        if not victims:
            return
        now = time.monotonic()
        for victim in victims:
            sched.running.remove(victim)
            # drop_stale_output: the victim may be resumed in this same step (a slot left
            # over), as after reset_prefix_cache; its in-flight output must not be applied.
            sched._preempt_request(victim, now, drop_stale_output=True)
            sched.prev_step_scheduled_req_ids.discard(victim.request_id)
        self.guard_preemptions += len(victims)


class GuardScheduler(_MakesRoomForUrgent, Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_guard()


class GuardAsyncScheduler(_MakesRoomForUrgent, AsyncScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_guard()
