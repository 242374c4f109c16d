"""What the guard knows about the engine behind it: is it there to take requests?

The launcher's supervisor (serve) or a health poller (proxy) writes it; the request path
reads `ready` once per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from vllm_guard.upstream.answers import dig, parse_json

log = logging.getLogger("vllm_guard.engine.state")


@dataclass(slots=True)
class EngineState:
    ready: bool = False
    phase: str = "starting"
    """starting | ready | hung | restarting | unreachable | stopping"""
    restarts: int = 0
    name: str = "engine"
    """How the logs call it (`engine`, or `engine 1 (http://...)` behind a guard with several)."""
    on_ready: Callable[[bool], None] | None = None
    """Told when `ready` changes (the guard takes the engine out of, or back into, rotation)."""

    def set(self, phase: str) -> None:
        if phase == "ready" and self.phase == "hung":
            return  # answering /health is not enough: the watchdog says when it works again
        if phase != self.phase:
            log.info("%s %s -> %s", self.name, self.phase, phase)
        self.phase = phase
        self._set_ready(phase == "ready")

    def set_hung(self, reason: str | None) -> None:
        """The watchdog's verdict: hung (`reason`), or working again (None)."""
        if reason is not None and self.phase == "ready":
            log.error("%s hung: %s; answering 503 until it works again", self.name, reason)
            self.phase = "hung"
            self._set_ready(False)
        elif reason is None and self.phase == "hung":
            log.warning("%s works again", self.name)
            self.phase = "ready"
            self._set_ready(True)

    def _set_ready(self, ready: bool) -> None:
        changed = ready != self.ready
        self.ready = ready
        if changed and self.on_ready is not None:
            self.on_ready(ready)


class AnyEngine:
    """Several engines as the request path sees them: ready while any one is."""

    __slots__ = ("engines",)

    def __init__(self, engines: Sequence[EngineState]) -> None:
        self.engines = engines

    @property
    def ready(self) -> bool:
        return any(e.ready for e in self.engines)

    @property
    def phase(self) -> str:
        return "ready" if self.ready else self.engines[0].phase


async def poll_health(
    state: EngineState,
    base_url: str,
    interval_s: float = 2.0,
    timeout_s: float = 2.0,
    headers: dict[str, str] | None = None,
) -> None:
    """Proxy mode: follow an engine we did not start by its `/health`, forever."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        while True:
            try:
                async with session.get(base_url + "/health") as resp:
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            state.set(
                "ready" if ok else ("unreachable" if state.phase != "starting" else "starting")
            )
            await asyncio.sleep(interval_s)


async def detect_scheduling_policy(
    base_url: str, headers: dict[str, str] | None = None
) -> str | None:
    """The upstream's `--scheduling-policy`, where vLLM tells it (`/server_info`, which
    only exists with VLLM_SERVER_DEV_MODE=1); None when it cannot be known."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
            session.get(base_url + "/server_info", params={"config_format": "json"}) as resp,
        ):
            if resp.status != 200:
                return None
            info = parse_json(await resp.read())
    except (aiohttp.ClientError, TimeoutError):
        return None
    policy = dig(info, "vllm_config", "scheduler_config", "policy")
    if not isinstance(policy, str) or not policy:
        if info is not None:
            log.warning("the upstream's /server_info has no scheduling policy where expected")
        return None
    return policy
