"""The scheduler plugin inside vLLM's own scheduler, built in-process (no HTTP, no model
run), as vLLM's scheduler tests do: add requests, run steps with made-up model outputs,
check who runs, who was preempted, and that every KV block comes back. vLLM's test helpers
are not in the wheel; the builders below are this project's own, for vLLM 0.32."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from vllm_guard.engine.plugin import METRICS_ENV
from vllm_guard.engine.preemption import POLICY_ENV, PreemptionPolicy
from vllm_guard.engine.scheduler import (
    GuardAsyncScheduler,
    GuardScheduler,
    check_vllm_version,
)
from vllm_guard.engine.tiny_model import ensure_tiny_model
from vllm_guard.testing.prometheus import parse_prometheus

BLOCK = 16
_ids = itertools.count()


def build(
    cls: type[Scheduler],
    max_num_seqs: int = 4,
    num_blocks: int = 1000,
    async_scheduling: bool = False,
) -> Scheduler:
    model = ModelConfig(model=str(ensure_tiny_model()), dtype="float32", seed=0)
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=4096,
        max_model_len=2048,
        enable_chunked_prefill=True,
        async_scheduling=async_scheduling,
        policy="priority",
        is_encoder_decoder=False,
    )
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=False)
    vllm_config = VllmConfig(
        scheduler_config=scheduler_config, model_config=model, cache_config=cache
    )
    kv = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(
                    block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32
                ),
            )
        ],
    )
    cache.num_gpu_blocks = num_blocks
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK,
    )


def request(priority: int, prompt_tokens: int = 8, max_tokens: int = 64) -> Request:
    i = next(_ids)
    return Request(
        request_id=f"r{i}-p{priority}",
        prompt_token_ids=[1 + i % 50] * prompt_tokens,
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        pooling_params=None,
        priority=priority,
    )


def step(scheduler: Scheduler) -> set[str]:
    """One scheduling step and a made-up model output (one token per scheduled request);
    the ids scheduled."""
    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    runner = ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[[7] for _ in ids],
    )
    scheduler.update_from_output(out, runner)
    return set(ids)


def add(scheduler: Scheduler, requests: list[Request], steps: int = 0) -> list[Request]:
    """Add the requests, then run `steps` steps."""
    for r in requests:
        scheduler.add_request(r)
    for _ in range(steps):
        step(scheduler)
    return requests


def drain(scheduler: Scheduler, max_steps: int = 2000) -> None:
    """Steps until every request has finished (or max_steps ran)."""
    for _ in range(max_steps):
        if not scheduler.has_requests():
            return
        step(scheduler)


@pytest.fixture(autouse=True)
def policy(monkeypatch):
    monkeypatch.setenv(
        POLICY_ENV,
        PreemptionPolicy(0, 4, 3, class_names={"0": "interactive", "10": "batch"}).to_env(),
    )
    monkeypatch.delenv(METRICS_ENV, raising=False)


def metrics(path) -> dict[str, float]:
    """The plugin's metrics file as {'name{labels}': value}."""
    return parse_prometheus(path.read_text())


def test_vllm_alone_never_makes_room_for_a_waiting_urgent_request():
    """The gap the plugin closes, on vLLM's own scheduler: slots full of batch, an urgent
    request waits until one finishes."""
    sched = build(Scheduler)
    add(sched, [request(10) for _ in range(4)], steps=1)
    (urgent,) = add(sched, [request(0)])
    for _ in range(5):
        assert urgent.request_id not in step(sched)
    assert urgent.status == RequestStatus.WAITING


@pytest.mark.parametrize("cls", [GuardScheduler, GuardAsyncScheduler])
def test_an_urgent_request_runs_in_the_next_step_and_its_victim_resumes(cls):
    sched = build(cls, async_scheduling=cls is GuardAsyncScheduler)
    batch = add(sched, [request(10, max_tokens=20) for _ in range(4)], steps=3)
    (urgent,) = add(sched, [request(0, max_tokens=3)])
    assert urgent.request_id in step(sched)  # scheduled in the very next step
    preempted = [r for r in batch if r.num_preemptions == 1]
    assert len(preempted) == 1
    assert all(r.priority == 10 for r in preempted)
    drain(sched, 200)
    assert not sched.has_requests()  # everyone finished, the victim too
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in [*batch, urgent])
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # no block leaked


def test_urgent_requests_are_never_preempted_for_each_other():
    sched = build(GuardScheduler)
    urgent = add(sched, [request(0) for _ in range(4)], steps=1)
    add(sched, [request(0)], steps=3)
    assert all(r.num_preemptions == 0 for r in urgent)


def test_an_urgent_request_short_of_kv_blocks_gets_them_from_batch():
    """Slots are free but the cache is full of batch decodes: the plugin preempts batch for
    the urgent request's blocks, which vLLM alone would leave waiting for blocks."""
    sched = build(GuardScheduler, max_num_seqs=8, num_blocks=13)  # 12 usable
    batch = add(sched, [request(10, prompt_tokens=40, max_tokens=60) for _ in range(4)], 2)
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 0  # 4 x 3 blocks
    (urgent,) = add(sched, [request(0, prompt_tokens=30, max_tokens=4)])
    assert urgent.request_id in step(sched)
    assert sum(r.num_preemptions for r in batch) >= 1
    drain(sched)
    assert not sched.has_requests()
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_the_plugin_counts_preemptions_recomputed_tokens_and_first_step_delays(
    monkeypatch, tmp_path
):
    path = tmp_path / "scheduler.prom"
    monkeypatch.setenv(METRICS_ENV, str(path))
    sched = build(GuardScheduler)
    assert path.exists()  # written at start: the guard can see the plugin runs
    batch = add(sched, [request(10, prompt_tokens=8, max_tokens=20) for _ in range(4)], 3)
    add(sched, [request(0, max_tokens=2)], steps=1)
    late = add(sched, [request(10, max_tokens=2)])  # waits: every slot is taken
    drain(sched)
    m = metrics(path)  # flushed when the engine went idle
    assert m["vllm_guard_scheduler_preemptions_total{class=batch,reason=guard}"] == 1
    # The victim had its 8 prompt tokens and 2 or 3 decoded tokens computed.
    victim = next(r for r in batch if r.num_preemptions)
    assert 8 <= m["vllm_guard_scheduler_recomputed_tokens_total{class=batch,reason=guard}"] <= 11
    assert victim.status == RequestStatus.FINISHED_LENGTH_CAPPED
    # The urgent request ran in the first step after it arrived; the late batch request
    # waited several steps for a slot.
    assert m["vllm_guard_scheduler_first_step_delay_steps_bucket{class=interactive,le=0.0}"] == 1
    assert m["vllm_guard_scheduler_first_step_delay_steps_count{class=batch}"] == 5
    assert m["vllm_guard_scheduler_first_step_delay_steps_bucket{class=batch,le=2.0}"] == 4
    assert late[0].status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert not sched._guard_arrivals  # nothing kept for requests that are gone


@pytest.mark.parametrize("cls", [GuardScheduler, GuardAsyncScheduler])
def test_urgent_step_alone_runs_the_urgent_prefill_without_batch_decodes(cls, monkeypatch):
    policy = PreemptionPolicy(0, 4, 3, True, {"0": "interactive", "10": "batch"})
    monkeypatch.setenv(POLICY_ENV, policy.to_env())
    sched = build(cls, max_num_seqs=5, async_scheduling=cls is GuardAsyncScheduler)
    batch = add(sched, [request(10, max_tokens=20) for _ in range(4)], steps=3)
    (urgent,) = add(sched, [request(0, max_tokens=3)])
    later = add(sched, [request(10, max_tokens=2) for _ in range(2)])  # wait for a slot
    assert step(sched) == {urgent.request_id}  # alone: batch skips this one step
    assert len(sched.running) == 5  # the waiting batch did not take the held slots
    assert step(sched) == {urgent.request_id, *(r.request_id for r in batch)}
    assert all(r.num_preemptions == 0 for r in batch)  # a free slot: nobody preempted
    drain(sched)
    done = [*batch, urgent, *later]
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in done)
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_the_plugin_refuses_another_vllm_version():
    check_vllm_version("0.32.0")
    with pytest.raises(RuntimeError, match=r"engine\.scheduler: vllm"):
        check_vllm_version("0.33.1")


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(
            st.integers(0, 3),  # steps before it arrives
            st.sampled_from([0, 0, 10, 20]),  # priority
            st.integers(1, 40),  # prompt tokens
            st.integers(1, 30),  # max tokens
        ),
        min_size=1,
        max_size=25,
    )
)
def test_any_interleaving_finishes_everyone_and_leaks_no_block(arrivals):
    """Enough KV blocks that vLLM itself never preempts: every preemption is the plugin's.
    Urgent requests are never preempted, nobody more than max_preemptions_per_request times,
    everyone finishes, and every block comes back."""
    sched = build(GuardScheduler, max_num_seqs=3)
    requests = []
    for wait, priority, prompt, max_tokens in arrivals:
        for _ in range(wait):
            step(sched)
        requests += add(sched, [request(priority, prompt, max_tokens)])
    drain(sched)
    assert not sched.has_requests()
    event(f"plugin preemptions: {min(sched.guard_preemptions, 3)}+")
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in requests)
    assert all(r.num_preemptions == 0 for r in requests if r.priority == 0)
    assert all(r.num_preemptions <= 3 for r in requests)
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.sampled_from([0, 0, 10, 20]),
            st.integers(1, 60),
            st.integers(1, 40),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_under_kv_pressure_everyone_finishes_and_no_block_leaks(arrivals):
    """A cache of 10 blocks for 6 slots: vLLM preempts for KV too, interleaved with the
    plugin's preemptions. Still everyone finishes and every block comes back, and the
    plugin itself never preempts an urgent request."""
    sched = build(GuardScheduler, max_num_seqs=6, num_blocks=11)
    requests = []
    for wait, priority, prompt, max_tokens in arrivals:
        for _ in range(wait):
            step(sched)
        requests += add(sched, [request(priority, prompt, max_tokens)])
    drain(sched, 5000)
    assert not sched.has_requests()
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in requests)
    by_reason = sched.guard_metrics.preemptions
    assert by_reason.labels("interactive", "guard")._value.get() == 0
    event(f"engine preemptions: {min(by_reason.labels('batch', 'engine')._value.get(), 3)}+")
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
