"""What the request path takes from one load of the config, built once per load.

A request reads `Generation.rules` once, when it arrives, and keeps that object to its end:
a reload (`GuardApp.reload`) builds new `Rules` and swaps the one reference, so requests
under way finish under the rules they arrived with — their tenant, class, quota gate and
refusal texts — while new ones get the new rules from their first step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from vllm_guard.config import CompiledConfig
from vllm_guard.proxy.admission_gate import RefusalReason, refusal_responses
from vllm_guard.proxy.auth import Authenticator
from vllm_guard.proxy.cache_salt import CacheSalts
from vllm_guard.proxy.charge import QuotaCharge
from vllm_guard.proxy.clock import Clock
from vllm_guard.proxy.metrics import GuardMetrics
from vllm_guard.proxy.quota_gate import TenantGate
from vllm_guard.proxy.responses import ErrorResponse


class Rules:
    __slots__ = ("auth", "cache_salts", "charge", "config", "quota_gates", "refusals")

    def __init__(
        self,
        config: CompiledConfig,
        quota_gates: Mapping[str, TenantGate],
        tokenize: Callable[[dict[str, Any]], Awaitable[int | None]],
        metrics: GuardMetrics,
        clock: Clock,
    ) -> None:
        """`quota_gates`: the gate of each tenant with limits (by name)."""
        self.config = config
        self.auth = Authenticator(config.key_digests, config.anonymous)
        self.cache_salts = CacheSalts(config.cache_salt_secret, config.tenants.values())
        self.quota_gates = quota_gates
        self.charge = QuotaCharge(config.tenants, tokenize, metrics, clock)
        self.refusals: dict[tuple[str, RefusalReason], ErrorResponse] = refusal_responses(
            config.classes
        )
