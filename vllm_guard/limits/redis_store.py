"""Tenant quotas shared by guard replicas through Redis.

One Lua script (`quota.lua`) does each operation — reserve (all dimensions or none),
top up, settle, renew — atomically, on Redis's own clock, with the same bucket arithmetic
as `core/quota.py`. Concurrency is a set of leases, one per open reservation, which this
replica renews while its requests run: a replica that dies stops renewing, its leases
expire, and its requests count as having used everything they reserved.

Reservations carry ids. A reserve whose answer never came (a timeout: Redis may or may not
have run it) is refunded as soon as Redis answers again, and expires with its lease if it
never does: never charged for good, never admitted twice.

`RedisQuotaStore` is the connection (one per guard) and its health: every call has a
deadline in milliseconds; the first that fails marks the store down, a probe brings it back
up within `PROBE_INTERVAL_S` of Redis answering. What a request does meanwhile is its
class's `on_store_down` (see `limits/shared_gate.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from vllm_guard.core.quota import (
    CONCURRENCY,
    PERIOD_S,
    REQUESTS,
    TOKENS_DAY,
    TOKENS_MINUTE,
    Denied,
    Limits,
)

log = logging.getLogger("vllm_guard.limits.redis")

_SCRIPT = resources.files("vllm_guard.limits").joinpath("quota.lua").read_text()
PROBE_INTERVAL_S = 0.5
"""While Redis is down: how often it is asked whether it is back."""
MAX_PENDING_SETTLES = 100_000
"""Settles (and refunds of unanswered reserves) kept for Redis's return; beyond, the oldest
are dropped and their leases' expiry charges them in full."""


class StoreDown(Exception):
    """Redis did not answer in time, or refused: the store counts as down."""


@dataclass(frozen=True, slots=True)
class Reply:
    """What the script answered."""

    granted: bool
    denied: Denied | None
    in_flight: int
    levels: tuple[float, ...]
    """Each dimension's bucket level after the operation, in `TenantKeys.dimensions` order."""


class TenantKeys:
    """One tenant's keys and the script arguments that describe its limits (built once)."""

    __slots__ = ("dimensions", "keys", "limits", "spec")

    def __init__(self, prefix: str, tenant: str, limits: Limits) -> None:
        # One hash tag, so the three keys live in one slot of a Redis Cluster.
        tag = f"{prefix}{{{tenant}}}"
        self.keys = (f"{tag}:buckets", f"{tag}:reservations", f"{tag}:leases")
        self.limits = limits
        burst = limits.burst or {}
        self.dimensions: list[tuple[str, float, float]] = []  # (name, capacity, rate per s)
        spec: list[Any] = []
        for dim in (REQUESTS, TOKENS_MINUTE, TOKENS_DAY):
            limit = getattr(limits, dim)
            if limit is not None:
                capacity, rate = burst.get(dim, limit), limit / PERIOD_S[dim]
                self.dimensions.append((dim, capacity, rate))
                spec += [dim, repr(capacity), repr(rate), "r" if dim == REQUESTS else "t"]
        cap = limits.max_concurrent
        # Encoded once: the client would encode these ~15 arguments on every call.
        self.spec: list[bytes] = [
            str(x).encode() for x in (-1 if cap is None else cap, len(self.dimensions), *spec)
        ]

    def limit_of(self, dimension: str) -> float:
        return float(getattr(self.limits, dimension))


class RedisQuotaStore:
    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        ca_file: str | None = None,
        timeout_s: float = 0.1,
        lease_s: float = 30.0,
        prefix: str = "vllm-guard:",
    ) -> None:
        """`timeout_s`: the deadline of every Redis call (connecting included);
        `lease_s`: how long a concurrency lease lives unless renewed (renewed every third
        of it)."""
        options: dict[str, Any] = {}
        if ca_file is not None:
            options["ssl_ca_certs"] = ca_file
        self.client = aioredis.Redis.from_url(
            url,
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One retry, at once, and only for a connection found closed (a pooled one that
            # Redis or a proxy dropped); a timeout is news now, not after retries.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            retry_on_timeout=False,
            health_check_interval=0,
            **options,
        )
        self._script = self.client.register_script(_SCRIPT)
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.prefix = prefix
        self.up = True
        self.failures = 0  # calls that failed (timeouts and errors)
        self.down_since: float | None = None
        self._ids = itertools.count()
        self._replica = secrets.token_hex(6)
        self._open: dict[str, TenantKeys] = {}  # this replica's open reservations: id -> keys
        self._pending: dict[str, tuple[TenantKeys, int, bool]] = {}  # settles Redis missed
        # What tenants' local buckets did while Redis was down (`catch_up_later`).
        self._catchups: list[
            tuple[TenantKeys, Sequence[float], int, int, Sequence[tuple[str, int]]]
        ] = []
        self._timeouts = 0  # calls in a row that missed their deadline
        self._flushing = False
        self._before_up: list[Callable[[], None]] = []
        self._back = asyncio.Event()  # set while the store is up
        self._back.set()
        self._settling: set[asyncio.Future[Any]] = set()

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._catchups)

    def keys_for(self, tenant: str, limits: Limits) -> TenantKeys:
        return TenantKeys(self.prefix, tenant, limits)

    def new_id(self) -> str:
        return f"{self._replica}:{next(self._ids)}"

    # -- operations -----------------------------------------------------------------------

    async def check(self, keys: TenantKeys, tokens: int) -> Reply:
        return await self._call(keys, "check", "", tokens)

    async def reserve(
        self,
        keys: TenantKeys,
        reservation_id: str,
        tokens: int,
        seed: Sequence[float] = (),
        overdraw: bool = False,
    ) -> Reply:
        """Reserve `tokens` (and one request, and a concurrency lease) under an id made by
        `new_id`. Raises `StoreDown` — and then refunds the id once Redis is back, in case
        the script ran and only its answer was lost. `seed`: each dimension's level for a
        bucket Redis does not have (after it lost its data), instead of full; `overdraw`:
        charge it whatever the buckets say (shadow mode; `denied` says what was overdrawn)."""
        op = "overdraw" if overdraw else "reserve"
        try:
            reply = await self._call(keys, op, reservation_id, tokens, seed)
        except StoreDown:
            self._pending[reservation_id] = (keys, 0, False)
            if self.up:  # one slow answer: refund it once Redis answers again
                self._flush_soon()
            raise
        if reply.granted:
            self._open[reservation_id] = keys
        return reply

    async def top_up(
        self,
        keys: TenantKeys,
        reservation_id: str,
        tokens: int,
        overdraw_within_s: float | None = None,
    ) -> Reply:
        """Add `tokens` to an open reservation on every token bucket, or none;
        `overdraw_within_s`: add them into debt where the buckets could pay them within
        that many seconds (shadow mode)."""
        if overdraw_within_s is None:
            return await self._call(keys, "top_up", reservation_id, tokens)
        return await self._call(
            keys, "overdraw_top_up", reservation_id, tokens, within_s=overdraw_within_s
        )

    async def settle(self, keys: TenantKeys, reservation_id: str, used: int, sent: bool) -> None:
        """End a reservation (see `TenantQuota.settle`); kept for Redis's return if it is down."""
        self._open.pop(reservation_id, None)
        if not self.up:
            self._keep(reservation_id, keys, used, sent)
            return
        try:
            await self._call(keys, "settle", ("" if sent else "!") + reservation_id, used)
        except StoreDown:
            self._keep(reservation_id, keys, used, sent)
            if self.up:
                self._flush_soon()

    def settle_soon(
        self,
        keys: TenantKeys,
        reservation_id: str,
        used: int,
        sent: bool,
        then: Callable[[], object] | None = None,
    ) -> None:
        """`settle` in the background (the request path does not wait for Redis to end a
        request); `then()` once it is done."""
        task = asyncio.ensure_future(self.settle(keys, reservation_id, used, sent))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        if then is not None:
            task.add_done_callback(lambda _: then())

    def catch_up_later(
        self,
        keys: TenantKeys,
        seed: Sequence[float],
        requests: int,
        tokens: int,
        running: Sequence[tuple[str, int]],
    ) -> None:
        """What a tenant's local buckets did while Redis was down, for Redis: `requests`
        and `tokens` its finished requests used, and its `running` requests (id, tokens
        reserved), which become reservations with leases like any other. `seed`: each
        bucket's level should Redis have lost it. Sent before Redis counts as up again."""
        for rid, _ in running:
            self._open[rid] = keys
        self._catchups.append((keys, seed, requests, tokens, running))
        if self.up:
            self._flush_soon()

    async def _flush_catchups(self) -> bool:
        """Send the queued catch-ups (whether or not the store counts as up yet)."""
        while self._catchups:
            keys, seed, requests, tokens, running = self._catchups[0]
            extra = [x for pair in running for x in (pair[0], pair[1])]
            try:
                await self._call(keys, "catchup", str(requests), tokens, seed, True, extra)
            except StoreDown:
                return False
            self._catchups.pop(0)
        return True

    def before_up(self, hook: Callable[[], None]) -> None:
        """Run `hook` when Redis answers again, before anything else is sent to it (the
        tenants' gates turn what they served locally into charges)."""
        self._before_up.append(hook)

    def _flush_soon(self) -> None:
        """Send what Redis missed in the background, while it counts as up (after a single
        late answer), retrying every `timeout_s` until it goes through or Redis is down."""
        if self._flushing:
            return
        self._flushing = True

        async def flush() -> None:
            try:
                while self.up and (self._pending or self._catchups):
                    await asyncio.sleep(self.timeout_s)
                    if self.up and await self._flush_pending():
                        return
            finally:
                self._flushing = False

        task = asyncio.ensure_future(flush())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _keep(self, reservation_id: str, keys: TenantKeys, used: int, sent: bool) -> None:
        if len(self._pending) >= MAX_PENDING_SETTLES:
            self._pending.pop(next(iter(self._pending)))
        self._pending[reservation_id] = (keys, used, sent)

    async def _call(
        self,
        keys: TenantKeys,
        op: str,
        rid: str,
        tokens: int,
        seed: Sequence[float] = (),
        force: bool = False,
        extra: Sequence[str | int] = (),
        within_s: float | None = None,
    ) -> Reply:
        """`force`: call even while the store counts as down (the catch-up before it is
        marked up again); `extra`: arguments after the seeds; `within_s`: the wait
        `overdraw_top_up` may stand for (passed where the lease length goes)."""
        if not (self.up or force):
            raise StoreDown("Redis is down")
        fourth = self.lease_s if within_s is None else within_s
        args: list[str | bytes | float] = [op, rid, tokens, fourth, *keys.spec]
        args += map(repr, seed)
        args += extra
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self._script(keys=keys.keys, args=args)
        except TimeoutError as exc:
            # Slow, not gone: one late answer (a busy event loop can make one) fails only
            # its own request; two in a row take the store down.
            self.failures += 1
            self._timeouts += 1
            if self._timeouts >= 2:
                self._went_down(exc)
            raise StoreDown("Redis did not answer in time") from None
        except (RedisError, OSError) as exc:
            self.failures += 1
            self._went_down(exc)
            raise StoreDown(str(exc) or type(exc).__name__) from None
        self._timeouts = 0
        return _reply(keys, raw)

    # -- health and leases ------------------------------------------------------------------

    def _went_down(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self.down_since = asyncio.get_running_loop().time()
        self._back.clear()
        log.warning(
            "the quota store (Redis) did not answer (%s): each class's on_store_down applies "
            "until it does",
            type(exc).__name__,
        )

    async def wait_up(self) -> None:
        """Until the store counts as up."""
        await self._back.wait()

    async def run(self) -> None:
        """Renew this replica's leases every third of `lease_s`; while Redis is down, probe
        it every `PROBE_INTERVAL_S` and, when it answers, send the settles it missed."""
        renew_every = self.lease_s / 3
        next_renew = asyncio.get_running_loop().time() + renew_every
        while True:
            now = asyncio.get_running_loop().time()
            if not self.up:
                await asyncio.sleep(PROBE_INTERVAL_S)
                if await self._probe():
                    await self._renew()
                continue
            if now >= next_renew:
                next_renew = now + renew_every
                await self._renew()
            await asyncio.sleep(min(PROBE_INTERVAL_S, max(0.0, next_renew - now)))

    async def _probe(self) -> bool:
        try:
            # Connections from before the outage are dead, or stuck on unanswered calls.
            await self.client.connection_pool.disconnect()
            async with asyncio.timeout(self.timeout_s):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        # Catch up before requests reach Redis again: what was served locally, then the
        # settles and refunds it missed.
        for hook in self._before_up:
            hook()
        if not await self._flush_pending():
            return False
        down_for = asyncio.get_running_loop().time() - (self.down_since or 0.0)
        self.up = True
        self.down_since = None
        self._back.set()
        log.warning("the quota store (Redis) answers again after %.1f s", down_for)
        return True

    async def _flush_pending(self) -> bool:
        """Send what Redis missed (while it counts as down): the tenants' catch-ups first
        (a settle of a request adopted there must find it), then settles and refunds;
        False if it fails again."""
        if not await self._flush_catchups():
            return False
        while self._pending:
            rid, (keys, used, sent) = next(iter(self._pending.items()))
            try:
                await self._call(keys, "settle", ("" if sent else "!") + rid, used, force=True)
            except StoreDown:
                return False
            self._pending.pop(rid, None)
        self._timeouts = 0
        return True

    async def _renew(self) -> None:
        by_tenant: dict[tuple[str, ...], list[str]] = {}
        for rid, keys in list(self._open.items()):
            by_tenant.setdefault(keys.keys, []).append(rid)
        for key_names, ids in by_tenant.items():
            try:
                async with asyncio.timeout(self.timeout_s * 4):
                    await self._script(
                        keys=key_names, args=["renew", "", 0, self.lease_s, -1, 0, *ids]
                    )
            except (RedisError, OSError, TimeoutError) as exc:
                self.failures += 1
                self._went_down(exc)
                return

    async def close(self) -> None:
        """Let the settles under way finish (briefly), then close the connections."""
        if self._settling:
            await asyncio.wait(self._settling, timeout=max(1.0, self.timeout_s * 4))
        await self.client.aclose()


def _reply(keys: TenantKeys, raw: Sequence[Any]) -> Reply:
    granted, dim, wait, in_flight = raw[:4]
    levels = tuple(float(x) for x in raw[4:])
    denied = None
    dimension = dim.decode() if isinstance(dim, bytes) else str(dim)
    if dimension == CONCURRENCY:
        denied = Denied(CONCURRENCY, keys.limit_of(CONCURRENCY), 0.0)
    elif dimension and dimension != "expired":
        denied = Denied(dimension, keys.limit_of(dimension), float(wait))
    return Reply(bool(int(granted)), denied, int(in_flight), levels)


def remaining_and_reset(keys: TenantKeys, levels: Sequence[float], dim: str) -> tuple[int, float]:
    """A dimension's remaining (whole) and seconds until full, from a reply's levels."""
    for (name, capacity, rate), level in zip(keys.dimensions, levels, strict=False):
        if name == dim:
            return max(0, math.floor(level)), max(0.0, (capacity - level) / rate)
    return 0, 0.0
