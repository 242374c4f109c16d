"""Priority classes and tenants as the request path uses them, compiled from the config
(`vllm_guard/config.py`): frozen, and free of pydantic and of I/O."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_guard.core.quota import Limits


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """A class as the request path uses it. `rank` 0 is the most urgent."""

    name: str
    rank: int
    vllm_priority: int
    slot_limit: int
    """Requests in vLLM at once this class may add to: S minus the slots reserved by more
    urgent classes (S + engine.queue_ahead for the most urgent class; with the scheduler
    plugin S + engine.batch_queue_ahead for the others)."""
    max_queue: int
    max_wait_s: float
    header_value: bytes
    default_max_tokens: int = 1024
    wait_on_limit: bool = False
    fair_queueing: bool = True
    kv_fraction: float = 0.9
    """Share of the KV capacity this class may fill together with all others: the
    watermark minus the shares reserved by more urgent classes."""
    engine_makes_room: bool = False
    """The engine's scheduler preempts less urgent classes for this one (`engine.scheduler:
    guard`, the most urgent class): only this class's own sequences and KV reservations
    count against its `slot_limit` and `kv_fraction`."""
    kv_admission: bool = True
    """Admitted by KV headroom, each request reserving its prompt and whole completion
    budget. False for the classes the engine preempts (`engine.scheduler: guard`): slots
    alone admit them and vLLM preempts them when decodes outgrow the cache — running every
    slot and recomputing the few it preempts yields more than holding sequences back for
    their worst case — while the plugin takes KV blocks from them for the urgent class."""
    on_store_down: str = "local"
    """With a shared quota store that cannot be reached: `local` (this replica's share of
    each tenant limit) or `reject` (503)."""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    priority_class: PriorityClass
    limits: Limits | None = None
    """None: no quota at all (nothing is counted for the tenant)."""
    weight: float = 1.0
    share_prefix_cache: bool = False
    """No tenant-own `cache_salt`: shares vLLM's cached prefixes with other such tenants."""
    shadow: bool = False
    """Limits charged as if enforced but never refusing or delaying (shadow mode)."""
