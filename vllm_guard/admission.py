"""The capacity gate and the admission queues: synchronous, no I/O, `now` passed in.

Engine slots S are shared by all classes; class c may hold a slot only while the total
in flight is below its `slot_limit` (S minus the slots reserved by more urgent classes).
So an interactive request finds a slot free the moment it arrives, however much batch
work is waiting: batch never waits *inside* vLLM, where it would take reserved slots.

Waiting requests queue here, one FIFO per class, served in strict priority: a class is
served only when every more urgent queue is empty. Because the slot limits shrink with
urgency, a blocked urgent head means the engine is full for everyone below it too.

The asyncio side (`gate.py`) turns the returned tickets into woken futures and arms one
timer per queue at `next_deadline()`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

from vllm_guard.config import PriorityClass


class TicketState(enum.Enum):
    WAITING = "waiting"
    ADMITTED = "admitted"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class Ticket:
    """A request waiting for (or holding) a slot. `waker` belongs to the caller."""

    __slots__ = ("deadline", "enqueued_at", "priority_class", "state", "waker")

    def __init__(self, priority_class: PriorityClass, now: float, waker: Any = None) -> None:
        self.priority_class = priority_class
        self.enqueued_at = now
        self.deadline = now + priority_class.max_wait_s
        self.state = TicketState.WAITING
        self.waker = waker


class Decision(enum.Enum):
    ADMITTED = "admitted"
    QUEUED = "queued"
    QUEUE_FULL = "queue_full"


class ClassStats(NamedTuple):
    """A snapshot for metrics and tests."""

    name: str
    in_flight: int
    slot_limit: int
    queued: int
    max_queue: int


class _ClassState:
    __slots__ = ("cancelled", "in_flight", "queue", "spec")

    def __init__(self, spec: PriorityClass) -> None:
        self.spec = spec
        self.in_flight = 0
        self.queue: deque[Ticket] = deque()
        self.cancelled = 0  # cancelled tickets still in `queue` (removed lazily)

    @property
    def queued(self) -> int:
        return len(self.queue) - self.cancelled

    def drop_cancelled_head(self) -> None:
        q = self.queue
        while q and q[0].state is TicketState.CANCELLED:
            q.popleft()
            self.cancelled -= 1


class Admission:
    """Slot accounting and per-class FIFO queues with strict priority between classes."""

    def __init__(self, max_num_seqs: int, classes: Iterable[PriorityClass]) -> None:
        self.max_num_seqs = max_num_seqs
        self._classes = sorted((_ClassState(c) for c in classes), key=lambda s: s.spec.rank)
        self._by_rank = {s.spec.rank: s for s in self._classes}
        self.in_flight = 0
        # EWMA of the time between two completions (any class); starts pessimistic.
        self._completion_interval_s = 1.0
        self._last_completion: float | None = None

    # -- the request path ------------------------------------------------------------

    def enter(self, priority_class: PriorityClass, now: float) -> tuple[Decision, Ticket]:
        """Admit at once, queue, or refuse. A QUEUED ticket is later returned by
        `release` (admitted) or `expire` (timed out), unless the caller `cancel`s it."""
        state = self._by_rank[priority_class.rank]
        ticket = Ticket(priority_class, now)
        if self._nobody_waiting_up_to(state.spec.rank) and self._fits(state):
            self._take(state, ticket)
            return Decision.ADMITTED, ticket
        if state.queued >= state.spec.max_queue:
            ticket.state = TicketState.EXPIRED
            return Decision.QUEUE_FULL, ticket
        state.queue.append(ticket)
        return Decision.QUEUED, ticket

    def release(self, ticket: Ticket, now: float) -> list[Ticket]:
        """Give back an admitted ticket's slot; returns the waiters admitted in its place."""
        assert ticket.state is TicketState.ADMITTED, ticket.state
        state = self._by_rank[ticket.priority_class.rank]
        ticket.state = TicketState.CANCELLED  # a released ticket can never be released again
        state.in_flight -= 1
        self.in_flight -= 1
        self._observe_completion(now)
        return self.dispatch()

    def retry_after_s(self, priority_class: PriorityClass) -> float:
        """A fair guess at when a refused request of this class would get in: the requests
        ahead of it (its queue and all more urgent ones) over the observed completion rate."""
        ahead = sum(s.queued for s in self._classes[: priority_class.rank + 1])
        return (ahead + 1) * self._completion_interval_s

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a waiting ticket (client gone). No-op unless it is still waiting."""
        if ticket.state is not TicketState.WAITING:
            return
        state = self._by_rank[ticket.priority_class.rank]
        ticket.state = TicketState.CANCELLED
        state.cancelled += 1
        state.drop_cancelled_head()

    def expire(self, now: float) -> list[Ticket]:
        """Remove and return every waiting ticket whose deadline has passed."""
        expired: list[Ticket] = []
        for state in self._classes:
            q = state.queue
            # max_wait_s is per class, so deadlines are in FIFO order within a queue.
            while q and q[0].deadline <= now:
                ticket = q.popleft()
                if ticket.state is TicketState.CANCELLED:
                    state.cancelled -= 1
                    continue
                ticket.state = TicketState.EXPIRED
                expired.append(ticket)
            state.drop_cancelled_head()
        # No dispatch needed: a waiter of a less urgent class fits only where the expired
        # (more urgent) ones would have fitted, and then they would have been admitted.
        return expired

    def next_deadline(self, priority_class: PriorityClass) -> float | None:
        """When the head of this class's queue times out; None if the queue is empty."""
        state = self._by_rank[priority_class.rank]
        state.drop_cancelled_head()
        return state.queue[0].deadline if state.queue else None

    # -- inspection ------------------------------------------------------------------

    def statistics(self) -> list[ClassStats]:
        return [
            ClassStats(s.spec.name, s.in_flight, s.spec.slot_limit, s.queued, s.spec.max_queue)
            for s in self._classes
        ]

    # -- internals -------------------------------------------------------------------

    def _observe_completion(self, now: float) -> None:
        if self._last_completion is not None:
            gap = max(0.0, now - self._last_completion)
            self._completion_interval_s += 0.1 * (gap - self._completion_interval_s)
        self._last_completion = now

    def _fits(self, state: _ClassState) -> bool:
        return self.in_flight < state.spec.slot_limit

    def _nobody_waiting_up_to(self, rank: int) -> bool:
        return all(s.queued == 0 for s in self._classes[: rank + 1])

    def _take(self, state: _ClassState, ticket: Ticket) -> None:
        ticket.state = TicketState.ADMITTED
        state.in_flight += 1
        self.in_flight += 1

    def dispatch(self) -> list[Ticket]:
        """Admit waiters, most urgent class first, while they fit; returns them."""
        admitted: list[Ticket] = []
        for state in self._classes:
            q = state.queue
            while q and self._fits(state):
                ticket = q.popleft()
                if ticket.state is TicketState.CANCELLED:
                    state.cancelled -= 1
                    continue
                self._take(state, ticket)
                admitted.append(ticket)
            state.drop_cancelled_head()
            if q:
                # Strict priority: this class is blocked (the engine is full for it and so
                # for every less urgent class), so nobody below may overtake it.
                break
        return admitted
