"""The guard's scheduler for vLLM: load it with `--scheduler-cls
vllm_guard.engine.scheduler.GuardScheduler` (or `GuardAsyncScheduler` where vLLM runs async
scheduling, as it does on GPU hosts; the CPU build turns it off).

Runs in vLLM's engine-core process and imports only vLLM, prometheus-client and this
package's `engine/preemption.py` and `engine/plugin.py`. Before each of vLLM's own
scheduling steps it preempts, for the most urgent waiting requests, the running requests
`preemption.choose_victims` picks — the same way vLLM's own
`reset_prefix_cache(reset_running_requests=True)` takes requests out of `running` outside
`schedule()` — so vLLM's priority queue then schedules the urgent requests first, in the
same step. Written against vLLM 0.32's `Scheduler`; on another version it refuses to load.

It also counts what it controls, per class: preemptions (its own and vLLM's KV ones) with
the tokens they throw away, and the delay from a request's arrival in the scheduler to its
first scheduled step, in seconds and in engine steps; written to the file named by
`VLLM_GUARD_SCHEDULER_METRICS` (see `engine/plugin.py`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import vllm
from prometheus_client import CollectorRegistry, Counter, Histogram, write_to_textfile
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_guard.engine.plugin import METRICS_ENV, refusal
from vllm_guard.engine.preemption import PreemptionPolicy, choose_victims

log = logging.getLogger("vllm_guard.engine.scheduler")

_FLUSH_EVERY_S = 1.0
_DELAY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DELAY_BUCKETS_STEPS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)


def check_vllm_version(version: str = vllm.__version__) -> None:
    reason = refusal(version)
    if reason is not None:
        raise RuntimeError(f"{reason}; run with engine.scheduler: vllm")


class SchedulerMetrics:
    """The plugin's counters, in a registry of their own, written to a file for the guard."""

    def __init__(self, path: str | None, classes: Iterable[str] = ()) -> None:
        """`classes`: the class names whose series start at 0 (rate() sees the first one)."""
        self.path = path
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.preemptions = Counter(
            "vllm_guard_scheduler_preemptions",
            "Running requests preempted in vLLM's engine, by the preempted request's class "
            "and by who preempted it: guard (to run a more urgent request) or engine (vLLM "
            "itself, for KV blocks).",
            ["class", "reason"],
            registry=r,
        )
        self.recomputed = Counter(
            "vllm_guard_scheduler_recomputed_tokens",
            "Computed tokens that preemptions threw away (to be computed again on resume, "
            "less what the prefix cache still holds).",
            ["class", "reason"],
            registry=r,
        )
        self.first_step_s = Histogram(
            "vllm_guard_scheduler_first_step_delay_seconds",
            "From a request's arrival in vLLM's scheduler to its first scheduled step.",
            ["class"],
            buckets=_DELAY_BUCKETS_S,
            registry=r,
        )
        self.first_step_steps = Histogram(
            "vllm_guard_scheduler_first_step_delay_steps",
            "Engine steps that ran without a request between its arrival in vLLM's "
            "scheduler and its first scheduled step (0: the first step after it arrived).",
            ["class"],
            buckets=_DELAY_BUCKETS_STEPS,
            registry=r,
        )
        self._last_flush = 0.0
        for name in classes:
            for reason in ("guard", "engine"):
                self.preemptions.labels(name, reason)
                self.recomputed.labels(name, reason)
            self.first_step_s.labels(name)
            self.first_step_steps.labels(name)

    def flush(self, now: float, force: bool = False) -> None:
        if self.path is None or (not force and now - self._last_flush < _FLUSH_EVERY_S):
            return
        self._last_flush = now
        try:
            write_to_textfile(self.path, self.registry)  # a temporary file, then a rename
        except OSError as exc:  # a metrics file must never stop the engine
            log.warning("cannot write %s: %s", self.path, exc)
            self.path = None


class _MakesRoomForUrgent:
    """The behaviour both schedulers share; mixed in before vLLM's class."""

    guard_policy: PreemptionPolicy
    guard_metrics: SchedulerMetrics
    guard_preemptions = 0
    """Preemptions this scheduler made (vLLM's own KV preemptions not counted)."""

    def _init_guard(self) -> None:
        check_vllm_version()
        self.guard_policy = PreemptionPolicy.from_env()
        self.guard_metrics = SchedulerMetrics(
            os.environ.get(METRICS_ENV), self.guard_policy.class_names.values()
        )
        self._guard_steps = 0
        self._guard_arrivals: dict[str, tuple[int, float]] = {}
        self._guard_preempting = False
        self.guard_metrics.flush(time.monotonic(), force=True)  # says: the plugin is running
        log.info("vllm-guard scheduler: %s", self.guard_policy)

    # -- vLLM's scheduler interface ------------------------------------------------------

    def add_request(self, request: Any) -> None:
        if request.request_id not in self.requests:  # type: ignore[attr-defined]
            # (not a streaming-input session's next chunk: that request arrived before)
            self._guard_arrivals[request.request_id] = (self._guard_steps, time.monotonic())
        super().add_request(request)  # type: ignore[misc]

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        self._make_room_for_urgent()
        sched: Any = self
        held = self._hold_less_urgent() if self.guard_policy.urgent_step_alone else []
        # Held requests keep their slots: vLLM must not fill them with waiting requests.
        sched.max_num_running_reqs -= len(held)
        sched.max_num_active_reqs -= len(held)
        try:
            output: SchedulerOutput = super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            sched.max_num_running_reqs += len(held)
            sched.max_num_active_reqs += len(held)
            sched.running += held
        self._observe_first_steps(output)
        self._guard_steps += 1
        return output

    def update_from_output(self, *args: Any, **kwargs: Any) -> Any:
        result = super().update_from_output(*args, **kwargs)  # type: ignore[misc]
        sched: Any = self
        idle = not sched.requests
        self.guard_metrics.flush(time.monotonic(), force=idle)
        if idle or len(self._guard_arrivals) > 2 * len(sched.requests) + 1024:
            # Requests that ended before their first step (aborted while waiting).
            self._guard_arrivals = {
                k: v for k, v in self._guard_arrivals.items() if k in sched.requests
            }
        return result

    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> None:
        computed = request.num_computed_tokens
        super()._preempt_request(request, *args, **kwargs)  # type: ignore[misc]
        labels = (
            self.guard_policy.class_name(request.priority),
            "guard" if self._guard_preempting else "engine",
        )
        self.guard_metrics.preemptions.labels(*labels).inc()
        self.guard_metrics.recomputed.labels(*labels).inc(computed)

    # -- the guard's part ----------------------------------------------------------------

    def _observe_first_steps(self, output: SchedulerOutput) -> None:
        arrivals, metrics = self._guard_arrivals, self.guard_metrics
        now = time.monotonic()
        requests: Any = self.requests  # type: ignore[attr-defined]
        for new in output.scheduled_new_reqs:
            arrived = arrivals.pop(new.req_id, None)
            if arrived is None:
                continue  # a preempted request resuming: not its first step
            name = self.guard_policy.class_name(requests[new.req_id].priority)
            metrics.first_step_s.labels(name).observe(now - arrived[1])
            metrics.first_step_steps.labels(name).observe(self._guard_steps - arrived[0])

    def _hold_less_urgent(self) -> list[Any]:
        """`urgent_step_alone`: when an urgent request waits for its first step, take the
        less urgent running requests out of `running` for this one step (they keep their
        blocks and simply are not scheduled, as when a step's token budget runs out)."""
        sched: Any = self
        waiting, urgent = sched.waiting, self.guard_policy.urgent_max_priority
        if not waiting or waiting.peek_request().priority > urgent:
            return []
        held = [r for r in sched.running if r.priority > urgent]
        if held:
            sched.running = [r for r in sched.running if r.priority <= urgent]
        return held

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
            sched.max_num_active_reqs - len(sched.running),  # vLLM's cap on admission
            block_pool.get_num_free_blocks(),
            sched.block_size,
            policy,
        )
        if not victims:
            return
        now = time.monotonic()
        self._guard_preempting = True
        try:
            for victim in victims:
                sched.running.remove(victim)
                # drop_stale_output: the victim may be resumed in this same step (a slot
                # left over), as after reset_prefix_cache; its in-flight output must not be
                # applied.
                sched._preempt_request(victim, now, drop_stale_output=True)
                sched.prev_step_scheduled_req_ids.discard(victim.request_id)
        finally:
            self._guard_preempting = False
        self.guard_preemptions += len(victims)


class GuardScheduler(_MakesRoomForUrgent, Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_guard()


class GuardAsyncScheduler(_MakesRoomForUrgent, AsyncScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_guard()
