"""The request path's clock: one seam for "now" and for the timers the waiters arm.

`LoopClock` is the event loop's monotonic clock (what the guard runs on). Tests inject a
manual clock with the same two methods and advance it, so waiting for a refill or a queue
deadline takes no real time. I/O timeouts (to vLLM, to clients) stay on the loop: they are
about real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run `callback(*args)` once `now()` reaches `when`."""
        ...


class LoopClock:
    """The running event loop's clock (the loop is looked up once, on first use)."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def now(self) -> float:
        return self._running().time()

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        return self._running().call_at(when, callback, *args)
