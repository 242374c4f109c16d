"""The capacity gate and the admission queues: synchronous, no I/O, `now` passed in.

Engine slots S are shared by all classes; class c may add sequences only while the total
in flight stays within its `slot_limit` (S minus the slots reserved by more urgent classes).
A ticket holds as many slots as vLLM runs sequences for it (prompts x n; usually 1).
So an interactive request finds a slot free the moment it arrives, however much batch
work is waiting: batch never waits *inside* vLLM, where it would take reserved slots.

Waiting requests queue here, one queue per class, served in strict priority: a class is
served only when every more urgent queue is empty. Because the slot limits shrink with
urgency, a blocked urgent head means the engine is full for everyone below it too.

Within a class, tenants share by weighted fair queueing on tokens (start-time fair
queueing): a ticket of tenant t with cost c gets the start tag S = max(V, F_t) and the
finish tag F_t = S + c / weight_t, where V is the start tag of the ticket admitted last;
waiters are admitted in finish-tag order. One tenant's tickets keep their arrival order,
and a tenant arriving behind another's 10,000 queued requests gets a tag just past V,
so it waits for about one request, not 10,000. A class set to `queueing: fifo` gives every
ticket the same tenant key, which makes the order plain FIFO.

KV cache: each admitted ticket also reserves `kv` tokens (prompt + completion budget,
capped at the model's length) until it is released. When the KV capacity is known, class
c is admitted only while `max(reserved, engine-reported usage) + kv` stays within its
`kv_fraction` of the capacity (the watermark minus the shares reserved by more urgent
classes). The engine's reading counts where it exceeds the guard's own reservations: load
the guard did not send, or estimates that were low. With nothing of the guard's in
flight a ticket is admitted whatever its size, so an oversized request cannot wait
forever. A queue head that does not fit blocks its class and those below (no
overtaking), as for slots.

With the scheduler plugin (`engine.scheduler: guard`) the engine itself preempts less
urgent work for the most urgent class (`PriorityClass.engine_makes_room`), so that class
counts only its own sequences and KV reservations against its limits, and no slot or KV
share is reserved below it; the preemptible classes are admitted by slots alone
(`kv_admission` off): vLLM preempts them for KV, as it would without the guard.

Several engines serving the same model (`vllm-guard proxy --upstream A --upstream B`): the
queues stay one per class, while slots and KV are counted per engine (`EngineSlots`), each
with the same limits. A ticket is admitted where it fits on some engine that is up, and
placed on the one with the most free slots for its class, then the most KV headroom —
spreading load rather than packing it, so each engine's queue and batch stay short. An
engine taken out (down, hung, refusing) admits nothing until it is back.

The asyncio side (`proxy/admission_gate.py`) turns the returned tickets into woken futures
and arms one timer per queue at `next_deadline()`.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Iterable
from typing import Any, NamedTuple

from vllm_guard.core.classes import PriorityClass


class TicketState(enum.Enum):
    WAITING = "waiting"
    ADMITTED = "admitted"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    TOO_LARGE = "too_large"
    """More sequences than its class may ever run: a reload lowered the class's slots."""


class Ticket:
    """A request waiting for (or holding) a slot. `waker` belongs to the caller.

    `tenant`, `cost` (prompt tokens + 2 x completion tokens, estimated) and `weight` order
    the waiters of one class by weighted fair queueing; `kv` is the KV cache it reserves and
    `seqs` the engine slots it holds (the sequences vLLM runs for it)."""

    __slots__ = (
        "affinity", "cost", "deadline", "engine", "enqueued_at", "finish", "kv",
        "priority_class", "seqs", "start", "state", "tenant", "waker", "weight",
    )  # fmt: skip

    def __init__(
        self,
        priority_class: PriorityClass,
        now: float,
        waker: Any = None,
        tenant: str = "",
        cost: float = 1.0,
        weight: float = 1.0,
        kv: int = 0,
        seqs: int = 1,
    ) -> None:
        self.priority_class = priority_class
        self.enqueued_at = now
        self.deadline = now + priority_class.max_wait_s
        self.state = TicketState.WAITING
        self.waker = waker
        self.tenant = tenant
        self.cost = cost
        self.weight = weight
        self.kv = kv
        self.seqs = seqs
        self.start = self.finish = 0.0
        self.engine = -1
        """Once admitted: the index of the engine it holds slots on."""
        self.affinity = -1
        """The engine it would rather run on (its conversation's cached prefix is there)."""


class Decision(enum.Enum):
    ADMITTED = "admitted"
    QUEUED = "queued"
    QUEUE_FULL = "queue_full"
    TOO_LARGE = "too_large"


class ClassStats(NamedTuple):
    """A snapshot for metrics and tests."""

    name: str
    in_flight: int
    slot_limit: int
    queued: int
    max_queue: int


class _ClassState:
    """One class's waiters: a heap in fair-queueing order (admission) and a heap by
    deadline (expiry; deadlines are arrival + the `max_wait_s` the class had then, which a
    reload may change). Tickets that left (admitted, cancelled, expired) are dropped from
    either lazily."""

    __slots__ = ("deadlines", "finish", "heap", "in_flight", "seq", "spec", "vtime", "waiting")

    def __init__(self, spec: PriorityClass) -> None:
        self.spec = spec
        self.in_flight = 0
        self.waiting = 0
        self.heap: list[tuple[float, int, Ticket]] = []
        self.deadlines: list[tuple[float, int, Ticket]] = []
        self.vtime = 0.0
        self.finish: dict[str, float] = {}
        self.seq = itertools.count()

    @property
    def queued(self) -> int:
        return self.waiting

    def push(self, ticket: Ticket) -> None:
        tenant = ticket.tenant if self.spec.fair_queueing else ""
        ticket.start = max(self.vtime, self.finish.get(tenant, 0.0))
        ticket.finish = ticket.start + ticket.cost / ticket.weight
        self.finish[tenant] = ticket.finish
        seq = next(self.seq)
        heapq.heappush(self.heap, (ticket.finish, seq, ticket))
        heapq.heappush(self.deadlines, (ticket.deadline, seq, ticket))
        self.waiting += 1

    def head(self) -> Ticket | None:
        """The waiting ticket with the smallest finish tag; None if none waits."""
        heap = self.heap
        while heap and heap[0][2].state is not TicketState.WAITING:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def pop_head(self) -> Ticket:
        ticket = heapq.heappop(self.heap)[2]
        self.waiting -= 1
        self.vtime = ticket.start
        return ticket

    def left(self) -> None:
        """A waiting ticket was cancelled or expired: keep the lazy structures bounded."""
        self.waiting -= 1
        if len(self.heap) > 2 * self.waiting + 64:
            self.heap = [e for e in self.heap if e[2].state is TicketState.WAITING]
            heapq.heapify(self.heap)
            self.deadlines = [e for e in self.deadlines if e[2].state is TicketState.WAITING]
            heapq.heapify(self.deadlines)
        self.drop_gone_deadlines()

    def drop_gone_deadlines(self) -> None:
        q = self.deadlines
        while q and q[0][2].state is not TicketState.WAITING:
            heapq.heappop(q)


class KvState:
    """What the gate knows of the KV cache, in tokens. `capacity` None: not known (slots
    alone decide); `live` None: no fresh reading from the engine (own accounting)."""

    __slots__ = ("capacity", "hold_batch", "live", "reserved")

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.live: int | None = None
        self.reserved = 0
        self.hold_batch = False  # engine stale and the posture says: admit only rank 0

    def used(self) -> int:
        return max(self.reserved, self.live or 0)


class EngineSlots:
    """One engine's part of the accounting: sequences in flight (all, and per class rank),
    KV reserved per class rank, its KV reading, and whether it takes requests."""

    __slots__ = ("class_in_flight", "class_kv", "in_flight", "index", "kv", "up")

    def __init__(self, index: int, n_classes: int, kv_capacity: int | None) -> None:
        self.index = index
        self.in_flight = 0
        self.class_in_flight = [0] * n_classes
        self.class_kv = [0] * n_classes
        self.kv = KvState(kv_capacity)
        self.up = True


class Admission:
    """Slot and KV accounting, per-class queues, strict priority between classes."""

    def __init__(
        self,
        max_num_seqs: int,
        classes: Iterable[PriorityClass],
        kv_capacity: int | None = None,
        engines: int = 1,
        affinity_slack: int = 2,
    ) -> None:
        """`engines`: how many engines (each with `max_num_seqs` slots) the guard fronts;
        `affinity_slack`: a ticket goes to the engine it prefers while that engine has at
        most this many fewer free slots than the roomiest."""
        self.max_num_seqs = max_num_seqs
        self.affinity_slack = affinity_slack
        self._classes = sorted((_ClassState(c) for c in classes), key=lambda s: s.spec.rank)
        self._by_rank = {s.spec.rank: s for s in self._classes}
        self.engines = [EngineSlots(i, len(self._classes), kv_capacity) for i in range(engines)]
        self.kv = self.engines[0].kv  # the KV state, where there is one engine
        self.in_flight = 0  # over all engines
        # EWMA of the time between two completions (any class); starts pessimistic.
        self._completion_interval_s = 1.0
        self._last_completion: float | None = None

    # -- the request path ------------------------------------------------------------

    def enter(
        self,
        priority_class: PriorityClass,
        now: float,
        tenant: str = "",
        cost: float = 1.0,
        weight: float = 1.0,
        kv: int = 0,
        seqs: int = 1,
        affinity: int = -1,
    ) -> tuple[Decision, Ticket]:
        """Admit at once, queue, or refuse. A QUEUED ticket is later returned by
        `release` (admitted), `dispatch` (after an engine update) or `expire` (timed
        out), unless the caller `cancel`s it. TOO_LARGE: `seqs` is over `max_seqs(class)`
        (checked when the request arrived, so a reload lowered it since). `affinity`: the
        engine it would rather run on (-1: none)."""
        assert seqs >= 1, seqs
        state = self._by_rank[priority_class.rank]
        ticket = Ticket(priority_class, now, None, tenant, cost, weight, kv, seqs)
        ticket.affinity = affinity
        if seqs > self.max_seqs(priority_class):
            ticket.state = TicketState.TOO_LARGE
            return Decision.TOO_LARGE, ticket
        if self._nobody_waiting_up_to(state.spec.rank) and (engine := self._place(state, ticket)):
            self._take(state, ticket, engine)
            return Decision.ADMITTED, ticket
        if state.queued >= state.spec.max_queue:
            ticket.state = TicketState.EXPIRED
            return Decision.QUEUE_FULL, ticket
        state.push(ticket)
        # A new arrival can go straight to the head of its class's fair order (its tenant
        # had nothing queued). Where requests hold several slots, the head it displaced may
        # be blocked where it fits: then it is next, now.
        if (
            state.head() is ticket
            and self._nobody_waiting_up_to(state.spec.rank - 1)
            and (engine := self._place(state, ticket))
        ):
            state.pop_head()
            self._take(state, ticket, engine)
            return Decision.ADMITTED, ticket
        return Decision.QUEUED, ticket

    def release(self, ticket: Ticket, now: float) -> list[Ticket]:
        """Give back an admitted ticket's slot; returns the waiters admitted in its place."""
        assert ticket.state is TicketState.ADMITTED, ticket.state
        rank = ticket.priority_class.rank
        state = self._by_rank[rank]
        engine = self.engines[ticket.engine]
        ticket.state = TicketState.CANCELLED  # a released ticket can never be released again
        state.in_flight -= ticket.seqs
        self.in_flight -= ticket.seqs
        engine.in_flight -= ticket.seqs
        engine.class_in_flight[rank] -= ticket.seqs
        engine.class_kv[rank] -= ticket.kv
        engine.kv.reserved -= ticket.kv
        self._observe_completion(now)
        return self.dispatch()

    def engine_update(
        self, live_tokens: int | None, capacity: int | None, hold_batch: bool, engine: int = 0
    ) -> list[Ticket]:
        """A new reading of an engine's KV use (None: stale); returns waiters it admits."""
        kv = self.engines[engine].kv
        kv.live = live_tokens
        if capacity is not None:
            kv.capacity = capacity
        kv.hold_batch = hold_batch
        return self.dispatch()

    def set_up(self, engine: int, up: bool) -> list[Ticket]:
        """Take an engine out (nothing more is placed on it; what it holds is released as
        its requests end) or put it back; returns the waiters it admits."""
        self.engines[engine].up = up
        return self.dispatch() if up else []

    def reconfigure(self, classes: Iterable[PriorityClass]) -> list[Ticket]:
        """New class settings (a config reload; the same classes, by rank): slot and KV
        limits, queue sizes and waits apply from now; tickets already waiting keep their
        deadlines, admitted ones their slots. Returns the waiters the new limits admit, and
        those (TOO_LARGE) with more sequences than their class may now ever run."""
        too_large = []
        for spec in classes:
            state = self._by_rank[spec.rank]
            state.spec = spec
            limit = self.max_seqs(spec)
            for _, _, ticket in list(state.heap):
                if ticket.state is TicketState.WAITING and ticket.seqs > limit:
                    ticket.state = TicketState.TOO_LARGE
                    too_large.append(ticket)
                    state.left()
        return too_large + self.dispatch()

    @property
    def kv_known(self) -> bool:
        """Some engine's KV capacity is known (KV admission applies)."""
        return any(e.kv.capacity is not None for e in self.engines)

    def max_seqs(self, priority_class: PriorityClass) -> int:
        """The most sequences one request of this class may run: what the class could ever
        hold at once (never more than the engine's S, whatever queue_ahead adds), under its
        settings now (a request that arrived before a reload carries the old ones)."""
        return min(self._by_rank[priority_class.rank].spec.slot_limit, self.max_num_seqs)

    def kv_headroom(self, priority_class: PriorityClass) -> float:
        """KV tokens a ticket of this class could reserve now on the roomiest engine that is
        up (inf: capacity unknown)."""
        rooms = [self._headroom(e, priority_class) for e in self.engines if e.up]
        return max(rooms, default=0.0)

    def _headroom(self, engine: EngineSlots, spec: PriorityClass) -> float:
        kv = engine.kv
        if kv.capacity is None:
            return float("inf")
        used = engine.class_kv[spec.rank] if spec.engine_makes_room else kv.used()
        return kv.capacity * spec.kv_fraction - used

    def retry_after_s(self, priority_class: PriorityClass) -> float:
        """A fair guess at when a refused request of this class would get in: the requests
        ahead of it (its queue and all more urgent ones) over the observed completion rate."""
        ahead = sum(s.queued for s in self._classes[: priority_class.rank + 1])
        return (ahead + 1) * self._completion_interval_s

    def cancel(self, ticket: Ticket) -> list[Ticket]:
        """Withdraw a waiting ticket (client gone); returns the waiters it was holding back
        (a queue head that did not fit blocks those behind it). No-op unless it waits."""
        if ticket.state is not TicketState.WAITING:
            return []
        state = self._by_rank[ticket.priority_class.rank]
        ticket.state = TicketState.CANCELLED
        state.left()
        return self.dispatch()

    def expire(self, now: float) -> list[Ticket]:
        """Remove and return every waiting ticket whose deadline has passed."""
        expired: list[Ticket] = []
        for state in self._classes:
            q = state.deadlines
            while q and q[0][0] <= now:
                ticket = heapq.heappop(q)[2]
                if ticket.state is not TicketState.WAITING:
                    continue
                ticket.state = TicketState.EXPIRED
                expired.append(ticket)
                state.left()
        # The caller dispatches next: an expired head that did not fit the KV headroom
        # may have been holding back smaller waiters behind it.
        return expired

    def next_deadline(self, priority_class: PriorityClass) -> float | None:
        """When the head of this class's queue times out; None if the queue is empty."""
        state = self._by_rank[priority_class.rank]
        state.drop_gone_deadlines()
        return state.deadlines[0][0] if state.deadlines else None

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

    def _place(self, state: _ClassState, ticket: Ticket) -> EngineSlots | None:
        """The engine to admit `ticket` on now: of those that are up and where it fits, the
        one with the most free slots for its class, then the most KV headroom — or the one
        the ticket prefers (`affinity`) while it has at most `affinity_slack` fewer free
        slots; None if it fits nowhere."""
        best: EngineSlots | None = None
        best_room = (False, 0, 0.0)
        preferred: tuple[bool, int, float] | None = None
        for engine in self.engines:
            room = self._room(engine, state.spec, ticket)
            if room is None:
                continue
            if engine.index == ticket.affinity:
                preferred = room
            if best is None or room > best_room:
                best, best_room = engine, room
        if (
            preferred is not None
            and preferred[0] >= best_room[0]
            and preferred[1] >= best_room[1] - self.affinity_slack
        ):
            return self.engines[ticket.affinity]
        return best

    def _room(
        self, engine: EngineSlots, spec: PriorityClass, ticket: Ticket
    ) -> tuple[bool, int, float] | None:
        """(fits its KV, free slots, KV headroom) for `ticket` on `engine`; None if it
        cannot go there now."""
        rank = spec.rank
        if not engine.up or (engine.kv.hold_batch and rank > 0):
            return None
        # Where the engine makes room for this class, only its own sequences count.
        in_flight = engine.class_in_flight[rank] if spec.engine_makes_room else engine.in_flight
        free = spec.slot_limit - in_flight
        if free < ticket.seqs:
            return None
        kv_room = self._headroom(engine, spec) if spec.kv_admission else float("inf")
        fits = ticket.kv <= kv_room
        if in_flight and not fits:
            return None
        # An oversized ticket goes to an engine with nothing of the guard's in flight only
        # where it fits nowhere: it could never be admitted otherwise.
        return (fits, free, kv_room)

    def _nobody_waiting_up_to(self, rank: int) -> bool:
        return all(s.queued == 0 for s in self._classes[: rank + 1])

    def _take(self, state: _ClassState, ticket: Ticket, engine: EngineSlots) -> None:
        rank = state.spec.rank
        ticket.state = TicketState.ADMITTED
        ticket.engine = engine.index
        state.in_flight += ticket.seqs
        self.in_flight += ticket.seqs
        engine.in_flight += ticket.seqs
        engine.class_in_flight[rank] += ticket.seqs
        engine.class_kv[rank] += ticket.kv
        engine.kv.reserved += ticket.kv

    def dispatch(self) -> list[Ticket]:
        """Admit waiters, most urgent class first, while they fit; returns them."""
        admitted: list[Ticket] = []
        for state in self._classes:
            while (head := state.head()) is not None and (engine := self._place(state, head)):
                ticket = state.pop_head()
                self._take(state, ticket, engine)
                admitted.append(ticket)
            state.drop_gone_deadlines()
            if state.waiting:
                # Strict priority: this class is blocked (the engine is full for it and so
                # for every less urgent class), so nobody below may overtake it.
                break
        return admitted
