"""Notices a hung engine (`core/hang.py` decides) and acts: 503s while it is hung, the
requests in it ended with an error, and — under `serve` — vLLM killed and restarted when it
stays hung for `engine.hang_restart_after_s`. An engine that resumes before that recovers
without a restart.

Once a second, while the engine is up: `/health` with a one-second deadline, and vLLM's
token counters, KV-cache use and request counts as the guard's metrics poller last read
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from vllm_guard.core.hang import HangDetector
from vllm_guard.engine.state import EngineState
from vllm_guard.upstream.monitor import EngineSample

log = logging.getLogger("vllm_guard.engine.watchdog")

PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 1.0


class EngineWatchdog:
    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        state: EngineState,
        sample: Callable[[], EngineSample | None],
        on_hung: Callable[[str], None],
        detect_after_s: float,
        restart: Callable[[str], Awaitable[None]] | None = None,
        restart_after_s: float = 60.0,
    ) -> None:
        """`sample`: the engine's last metrics reading; `on_hung`: end what is in flight;
        `restart`: kill the engine so its supervisor restarts it (None in proxy mode)."""
        self.base_url = base_url
        self.headers = headers
        self.state = state
        self.sample = sample
        self.on_hung = on_hung
        self.restart = restart
        self.restart_after_s = restart_after_s
        self.detect_after_s = detect_after_s

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        detector = HangDetector(self.detect_after_s, loop.time())
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        flagged = False  # on_hung ran for the current hang
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            while True:
                await asyncio.sleep(PROBE_EVERY_S)
                now = loop.time()
                if self.state.phase not in ("ready", "hung", "unreachable"):
                    detector.reset(now)  # starting or restarting: the supervisor watches
                    flagged = False
                    continue
                detector.health(await self._probe(session), loop.time())
                sample = self.sample()
                if sample is not None:
                    work = None if sample.tokens is None else (sample.tokens, sample.kv_usage)
                    detector.progress(work, sample.busy, sample.at)
                now = loop.time()
                reason = detector.hung(now)
                self.state.set_hung(reason)
                if reason is None:
                    flagged = False
                    continue
                if not flagged:
                    flagged = True
                    self.on_hung(reason)
                since = detector.hung_since if detector.hung_since is not None else now
                if self.restart is not None and now - since >= self.restart_after_s:
                    log.error("engine hung for %.0f s: restarting it", now - since)
                    await self.restart(reason)
                    detector.reset(loop.time())

    async def _probe(self, session: aiohttp.ClientSession) -> bool:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with session.get(self.base_url + "/health") as resp:
                return resp.status == 200
        return False
