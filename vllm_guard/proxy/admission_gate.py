"""The asyncio side of admission: futures for waiters, one timer per class queue.

`Gate.acquire` returns an admitted ticket or raises `Refused`; every path out of it
(admitted, refused, timed out, cancelled by a client disconnect) leaves the core's
accounting exact: a cancelled waiter leaves its queue, and a waiter admitted in the same
instant as it was cancelled gives its slot straight back.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import Iterable

from vllm_guard.core.admission import Admission, Decision, Ticket, TicketState
from vllm_guard.core.classes import PriorityClass
from vllm_guard.proxy.clock import Clock, LoopClock, TimerHandle
from vllm_guard.proxy.responses import ErrorResponse


class RefusalReason(enum.Enum):
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    SHUTTING_DOWN = "shutting_down"
    QUOTA_STORE_DOWN = "quota_store_unavailable"  # on_store_down: reject


class Refused(Exception):
    """Not admitted. `retry_after_s` is the gate's estimate of when a retry would get in."""

    def __init__(self, reason: RefusalReason, priority_class: PriorityClass, retry_after_s: float):
        super().__init__(reason.value)
        self.reason = reason
        self.priority_class = priority_class
        self.retry_after_s = retry_after_s


class TooManySequences(Exception):
    """The request runs more sequences than its class may now ever run at once (a reload
    lowered the class's slots after the request was checked): a 400, like one that arrives
    so."""

    def __init__(self, max_seqs: int) -> None:
        super().__init__(f"at most {max_seqs} sequences")
        self.max_seqs = max_seqs


class Gate:
    def __init__(
        self, admission: Admission, clock: Clock | None = None, drain_retry_after_s: float = 5.0
    ) -> None:
        """`drain_retry_after_s`: the retry-after of requests refused by a drain."""
        self.admission = admission
        self.draining = False
        self._drain_retry_after_s = drain_retry_after_s
        self._clock = clock or LoopClock()
        self._timers: dict[int, tuple[float, TimerHandle]] = {}  # rank -> (when, timer)

    async def acquire(
        self,
        priority_class: PriorityClass,
        tenant: str = "",
        cost: float = 1.0,
        weight: float = 1.0,
        kv: int = 0,
        seqs: int = 1,
        affinity: int = -1,
    ) -> Ticket:
        if self.draining:
            raise Refused(RefusalReason.SHUTTING_DOWN, priority_class, self._drain_retry_after_s)
        decision, ticket = self.admission.enter(
            priority_class, self._clock.now(), tenant, cost, weight, kv, seqs, affinity
        )
        if decision is Decision.ADMITTED:
            return ticket
        if decision is Decision.QUEUE_FULL:
            raise self._refusal(RefusalReason.QUEUE_FULL, priority_class)
        if decision is Decision.TOO_LARGE:
            raise TooManySequences(self.admission.max_seqs(priority_class))
        waker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket.waker = waker
        self._arm(priority_class)
        try:
            await waker
        except asyncio.CancelledError:
            if ticket.state is TicketState.ADMITTED:
                self.release(ticket)  # woken and cancelled in the same loop turn
            else:
                self.wake(self.admission.cancel(ticket))
            raise
        if ticket.state is TicketState.TOO_LARGE:
            raise TooManySequences(self.admission.max_seqs(priority_class))
        if ticket.state is TicketState.EXPIRED:
            if self.draining:
                raise Refused(
                    RefusalReason.SHUTTING_DOWN, priority_class, self._drain_retry_after_s
                )
            raise self._refusal(RefusalReason.QUEUE_TIMEOUT, priority_class)
        return ticket

    def drain(self) -> None:
        """The server stops: refuse every waiter now (503, shutting_down) and any new
        request; admitted ones run on until the drain timeout."""
        if self.draining:
            return
        self.draining = True
        for ticket in self.admission.expire(math.inf):
            _wake(ticket)

    def release(self, ticket: Ticket) -> None:
        """Give an admitted ticket's slot back and wake whoever it admits."""
        self.wake(self.admission.release(ticket, self._clock.now()))

    def _refusal(self, reason: RefusalReason, priority_class: PriorityClass) -> Refused:
        guess = self.admission.retry_after_s(priority_class)
        return Refused(reason, priority_class, min(max(guess, 1.0), 60.0))

    def _arm(self, priority_class: PriorityClass) -> None:
        """The class's timer at its earliest deadline (earlier than the one armed: a
        reload shortened `max_wait_s`)."""
        rank = priority_class.rank
        deadline = self.admission.next_deadline(priority_class)
        armed = self._timers.get(rank)
        if deadline is None or (armed is not None and armed[0] <= deadline):
            return
        if armed is not None:
            armed[1].cancel()
        timer = self._clock.call_at(deadline, self._on_timer, priority_class)
        self._timers[rank] = (deadline, timer)

    def _on_timer(self, priority_class: PriorityClass) -> None:
        del self._timers[priority_class.rank]
        # The loop may run a timer up to its clock resolution early; allow for that.
        for ticket in self.admission.expire(self._clock.now() + _TIMER_SLACK_S):
            _wake(ticket)  # the waiter sees EXPIRED and raises
        self.wake(self.admission.dispatch())
        self._arm(priority_class)

    def reconfigure(self, classes: Iterable[PriorityClass]) -> None:
        """New class settings (a config reload): see `Admission.reconfigure`."""
        self.wake(self.admission.reconfigure(classes))

    def wake(self, admitted: list[Ticket]) -> None:
        """Wake waiters the core admitted outside `release` (an engine update, an expiry)."""
        for ticket in admitted:
            _wake(ticket)


_TIMER_SLACK_S = 1e-3


def _wake(ticket: Ticket) -> None:
    # A waiter whose task was cancelled in this same loop turn has a cancelled future;
    # it will see its ticket's state (ADMITTED: give the slot back) when it resumes.
    if not ticket.waker.done():
        ticket.waker.set_result(None)


def retry_after_header(seconds: float) -> bytes:
    """Whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds)."""
    return str(max(1, math.ceil(seconds))).encode()


def refusal_responses(
    classes: Iterable[PriorityClass],
) -> dict[tuple[str, RefusalReason], ErrorResponse]:
    """The 503 for each class and reason, built once at load."""
    out = {}
    for c in classes:
        full = (
            f"The {c.name!r} queue is full ({c.max_queue} requests waiting); retry after the "
            "delay in the retry-after header."
        )
        timeout = (
            f"No engine slot became free for class {c.name!r} within its max_wait_s of "
            f"{c.max_wait_s:g} s; retry after the delay in the retry-after header."
        )
        stopping = (
            "vllm-guard is shutting down; retry after the delay in the retry-after header "
            "(another replica, or this one once it is back)."
        )
        store_down = (
            "vllm-guard cannot reach its shared quota store, and the class "
            f"{c.name!r} is set to refuse requests until it can (on_store_down: reject); "
            "retry after the delay in the retry-after header."
        )
        for reason, message in (
            (RefusalReason.QUOTA_STORE_DOWN, store_down),
            (RefusalReason.QUEUE_FULL, full),
            (RefusalReason.QUEUE_TIMEOUT, timeout),
            (RefusalReason.SHUTTING_DOWN, stopping),
        ):
            out[c.name, reason] = ErrorResponse(503, message, "service_unavailable", reason.value)
    return out
