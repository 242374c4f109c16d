"""limits.yaml: strict, frozen pydantic models, compiled once into runtime objects.

Loading goes YAML -> `GuardConfig` (validation, every unknown key an error) ->
`CompiledConfig` (classes ordered by urgency, slot limits worked out, API keys resolved
to SHA-256 digests). A reload builds a new `CompiledConfig` and swaps one reference.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_guard.core.classes import PriorityClass, Tenant
from vllm_guard.core.quota import Limits

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)
_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DEFAULT_CONFIG = "limits.yaml"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, key path and fix."""


class EngineConfig(BaseModel):
    model_config = _STRICT

    max_num_seqs: Annotated[int, Field(ge=1, le=65536)] = 16
    """Engine sequence slots S (vLLM's `--max-num-seqs`). The launcher passes it to vLLM;
    in proxy mode it must match what the upstream was started with (each upstream)."""
    upstreams: Annotated[tuple[str, ...], Field(strict=False)] = ()
    """Proxy mode: the engines' base URLs (`http://host:port[/prefix]`), where
    `--upstream` is not given. Several: engines serving the same model, each with
    `max_num_seqs` slots; the guard spreads requests by free slots and KV headroom, takes
    an engine that is down, hung or refusing out of rotation, and sends a request an
    engine never took to another."""

    affinity: Literal["session", "none"] = "session"
    """Several upstreams: `session` sends a request with an `x-session-id` header to the
    engine that served that session's (and tenant's) previous request, where its
    conversation's prefix is cached, while that engine has room (`affinity_slack`); `none`
    places every request by room alone."""
    affinity_slack: Annotated[int, Field(ge=0, le=65536)] = 2
    """How many fewer free slots than the roomiest engine a session's engine may have and
    still get the session's next request."""

    @model_validator(mode="after")
    def _upstream_urls(self) -> EngineConfig:
        from vllm_guard.upstream.h1client import split_base_url

        for i, url in enumerate(self.upstreams):
            try:
                split_base_url(url)
            except ValueError as exc:
                raise _at(("upstreams", str(i)), str(exc)) from None
        if len(set(self.upstreams)) != len(self.upstreams):
            raise _at(("upstreams",), "an engine is listed twice")
        return self

    queue_ahead: Annotated[int, Field(ge=0, le=65536)] = 4
    """Requests of the most urgent class the guard may send beyond the S slots, to wait
    inside vLLM (whose priority scheduling runs them first): a slot that frees is refilled
    in the engine's next step instead of after a round trip through the guard and vLLM's
    request preprocessing. Less urgent classes never get these, since vLLM would hand a
    freed reserved slot to whatever waits in it. 0: never more than S requests in vLLM."""
    scheduler: Literal["vllm", "guard"] | None = None
    """Unset (the default): `serve` runs `guard` where this vLLM supports the plugin, else
    `vllm`; `proxy` takes `vllm` (say `guard` when the upstream runs the plugin).
    `vllm`: vLLM's own scheduler; classes' `reserved_seqs`/`reserved_kv` keep room for
    the urgent ones, and every request reserves its worst-case KV. `guard`: vllm-guard's
    scheduler plugin (`vllm_guard.engine.scheduler`, vLLM 0.32): when requests of the most
    urgent class wait, the engine preempts running sequences of less urgent classes to run
    them in the same step, so no slot or KV share is reserved (every class may fill the
    engine, and queue `batch_queue_ahead` more inside vLLM) and preemptible classes reserve
    only their prompts' KV. `serve` loads the plugin (or falls back to `vllm`, with the
    reservations, where it cannot); in proxy mode it says the upstream runs it."""
    batch_queue_ahead: Annotated[int, Field(ge=0, le=65536)] | None = None
    """`scheduler: guard` only: requests of the less urgent classes the guard may send
    beyond the S slots, to wait inside vLLM (which runs them the step a slot frees; the
    plugin still preempts them for the most urgent class). Default S: a whole wave of
    equal-length batch requests finishing together is refilled in the engine's next step,
    not after a trip through the guard and vLLM's API server."""
    scheduler_metrics_file: str | None = None
    """Proxy mode with the plugin: the file the upstream's plugin writes its metrics to (the
    `VLLM_GUARD_SCHEDULER_METRICS` vLLM was started with, on the same host), shown on the
    guard's /metrics. `serve` sets this up itself."""
    max_preemptions_per_step: Annotated[int, Field(ge=1, le=1024)] = 4
    """`scheduler: guard`: sequences the plugin may preempt in one engine step."""
    urgent_step_alone: bool = False
    """`scheduler: guard`: the engine step that runs an urgent request's prefill runs no
    less urgent decodes (they skip that step). Off by default: see the README's
    measurement."""
    max_preemptions_per_request: Annotated[int, Field(ge=0, le=1000)] = 3
    """`scheduler: guard`: a sequence preempted this often is not chosen again, so less
    urgent work always finishes."""
    kv_admission: bool = True
    """Admit by KV-cache headroom as well as by slots (capacity read from the engine's
    /metrics, or `kv_capacity_tokens`). Each request reserves its prompt + completion
    budget, capped at the model's max_model_len, until it ends."""
    kv_watermark: Annotated[float, Field(gt=0, le=1, strict=False)] = 0.9
    """Share of the KV capacity the guard fills; the rest absorbs estimate errors."""
    kv_capacity_tokens: Annotated[int, Field(ge=1)] | None = None
    """KV capacity in tokens, where the engine's metrics do not say (they do on vLLM >= 0.7)."""
    metrics_interval_s: Annotated[float, Field(ge=0.01, le=10, strict=False)] = 0.1
    """How often the guard reads the engine's /metrics."""
    metrics_stale_after_s: Annotated[float, Field(gt=0, strict=False)] = 1.0
    """A reading older than this is stale: the guard falls back (see `on_stale`)."""
    hang_detect_s: Annotated[float, Field(ge=1, le=600, strict=False)] = 5.0
    """The engine counts as hung when its `/health` goes unanswered this long, or when it
    has requests and produces no token this long: then the guard answers 503 and ends the
    requests in it."""
    hang_restart_after_s: Annotated[float, Field(ge=1, strict=False)] = 60.0
    """`serve`: an engine hung this long is killed and restarted (one that resumes before
    recovers without a restart)."""
    on_stale: Literal["own_accounting", "hold_batch"] = "own_accounting"
    """With stale engine metrics: keep admitting on the guard's own KV reservations
    (`own_accounting`, the default: the guard's own reservations are an upper bound on
    what its requests use), or admit only the most urgent class (`hold_batch`)."""

    @property
    def holds_batch_when_stale(self) -> bool:
        """`on_stale: hold_batch`: with stale engine metrics only the most urgent class is
        admitted."""
        return self.on_stale == "hold_batch"


class GuardSettings(BaseModel):
    model_config = _STRICT

    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    """Largest request body accepted, in bytes; larger ones get 413."""
    max_waiting_body_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    """Bytes of request bodies the guard may hold for requests not yet admitted (waiting
    for their tenant's budget or in a class queue), over all classes; beyond it new
    requests get 503 with retry-after. Bounds the memory a flood of queued work takes
    (max_queue x max_body_bytes could be gigabytes); parsed requests take a few times
    their body's size in memory."""
    max_header_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024
    """Largest request head (request line and headers) accepted, in bytes; larger: 431."""
    max_headers: Annotated[int, Field(ge=8)] = 100
    """Most request headers accepted; more: 431."""
    header_timeout_s: Annotated[float, Field(gt=0, strict=False)] = 10.0
    """Time a client has to send a whole request head, from its connection opening or the
    request's first byte; slower: 408 and the connection is closed."""
    body_timeout_s: Annotated[float, Field(gt=0, strict=False)] = 60.0
    """Time a client has to send a whole request body after its head; slower: 408."""
    max_connections: Annotated[int, Field(ge=1)] = 4096
    """Client connections open at once; one more is answered 503 and closed."""
    send_stall_timeout_s: Annotated[float, Field(gt=0, strict=False)] = 60.0
    """How long the guard waits on a client that reads none of its response before it drops
    the connection (releasing the request's slot, KV and quota; vLLM aborts the request)."""
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    """On SIGTERM/Ctrl-C: how long in-flight requests may take to finish before they are cut."""
    upstream_connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    """Time allowed to open a connection to vLLM."""
    upstream_read_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """Longest silence allowed between two reads from vLLM (a stalled engine gives 504)."""
    unavailable_retry_after_s: Annotated[int, Field(ge=1, le=600)] = 5
    """`retry-after` sent with 503s while the engine is starting, restarting or unreachable."""
    anonymous_tenant: str | None = None
    """Tenant for requests without a known API key. Unset (the default): such requests get 401."""
    max_concurrent_tokenize: Annotated[int, Field(ge=1, le=1024)] = 8
    """vLLM `/tokenize` calls the guard makes at once to count prompts; a request that
    finds them all busy is counted by a tokenizer-free estimate instead (never waits)."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics port (`metrics_port`); `--metrics-host` overrides it."""
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Serve /metrics and /metrics/engine only on this port (the public port then answers
    404 for them: tenant names, per-tenant counters and the engine's config stay off the
    network clients reach). Unset: on the public port. `--metrics-port` overrides it."""
    cache_salt_secret: str | None = None
    """`env:VAR`: the secret tenants' prefix-cache salts are derived from. Unset: a random
    one per start. Set it to the same secret on guard replicas in front of one engine, so
    a tenant's cached prefixes serve it through any of them."""
    engine_key: str | None = None
    """`env:VAR`: the key the engine requires on every request (vLLM run with
    `--middleware vllm_guard.engine.middleware.RequireGuardKey` and the same key in its
    `VLLM_GUARD_ENGINE_KEY`). Proxy mode: set it when the upstream runs the middleware.
    `serve` sets one up itself (this key, or `$VLLM_GUARD_ENGINE_KEY`, else a random one)."""
    upstream_api_key: str | None = None
    """Key the guard presents to vLLM (`env:VAR`), when vLLM runs with `--api-key`."""
    quota_store: str = "memory"
    """Where tenants' buckets live: `memory` (this process; the default) or a Redis URL,
    `redis://HOST:PORT/DB` or `rediss://...` (TLS), shared by every guard replica that
    names it, so the replicas together keep each limit. Credentials go in
    `quota_store_password`, never in the URL."""
    quota_store_password: str | None = None
    """`env:VAR`: the Redis password (AUTH). A Redis 6 ACL user goes in the URL
    (`redis://USER@HOST:PORT/DB`)."""
    quota_store_ca_file: str | None = None
    """`rediss://` with a private CA: the PEM file that signs the server's certificate."""
    quota_store_timeout_s: Annotated[float, Field(gt=0, le=5, strict=False)] = 0.1
    """Deadline of each Redis call, connecting included. Two calls in a row that miss it (or
    an error, such as a refused connection) mark the store down (each class's
    `on_store_down` applies) until Redis answers a probe again (every 0.5 s); a single late
    answer is asked again once."""
    quota_store_lease_s: Annotated[float, Field(ge=1, le=3600, strict=False)] = 30.0
    """A request's concurrency lease in Redis lives this long unless its replica renews it
    (every third of it): when a guard dies, its requests stop counting after at most this
    long, charged all they reserved."""
    replicas: Annotated[int, Field(ge=1, le=1024)] = 1
    """Guard replicas sharing `quota_store`. While Redis is down each replica charges its
    own buckets at each limit divided by this (classes with `on_store_down: local`); the
    live count cannot be read then, so it is configured."""

    @model_validator(mode="after")
    def _quota_store_url(self) -> GuardSettings:
        url = self.quota_store
        if url == "memory":
            return self
        if not url.startswith(("redis://", "rediss://")):
            raise _at(
                ("quota_store",),
                "expected memory or a Redis URL (redis://HOST:PORT/DB, rediss:// for TLS)",
            )
        if ":" in url.split("://", 1)[1].split("@", 1)[0] and "@" in url:
            raise _at(
                ("quota_store",),
                "a password in the URL is not accepted (it would sit in the config file): "
                "set quota_store_password: env:VARIABLE",
            )
        return self


class LimitsConfig(BaseModel):
    """A tenant's quota; every key is optional and a missing one is unlimited."""

    model_config = _STRICT

    requests_per_minute: Annotated[float, Field(gt=0, strict=False)] | None = None
    tokens_per_minute: Annotated[float, Field(gt=0, strict=False)] | None = None
    """Prompt plus completion tokens, charged up front (see core/quota.py) and settled with
    usage."""
    tokens_per_day: Annotated[float, Field(gt=0, strict=False)] | None = None
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    """Requests of the tenant admitted at once (queued in the guard or running in vLLM)."""
    burst: Mapping[
        Literal["requests_per_minute", "tokens_per_minute", "tokens_per_day"],
        Annotated[float, Field(gt=0, strict=False)],
    ] = Field(default_factory=dict)
    """Bucket capacity per dimension where it should differ from the limit itself."""

    @model_validator(mode="after")
    def _burst_needs_limit(self) -> LimitsConfig:
        for dim in self.burst:
            if getattr(self, dim) is None:
                raise _at(("burst", dim), f"a burst for {dim} needs {dim} itself to be set")
        return self


class PriorityClassConfig(BaseModel):
    model_config = _STRICT

    vllm_priority: int
    """The `priority` sent to vLLM; lower is more urgent (vLLM's priority policy).
    Classes are ordered by it, so it also orders the guard's own queues."""
    reserved_seqs: Annotated[int, Field(ge=0)] = 0
    """Engine slots that less urgent classes may never use, kept free for this class
    (and more urgent ones) so a slot is open the moment such a request arrives."""
    reserved_kv: Annotated[float, Field(ge=0, lt=1, strict=False)] = 0.0
    """Share of the KV capacity that less urgent classes may never reserve, as
    `reserved_seqs` is for slots."""
    max_queue: Annotated[int, Field(ge=0)] = 1000
    """Requests of this class that may wait in the guard; beyond it, 503 at once."""
    max_wait_s: Annotated[float, Field(ge=0)] = 30.0
    """Longest a request of this class waits for a slot before it gets 503."""
    default_limits: LimitsConfig | None = None
    """Limits for the class's tenants that set no `limits` of their own."""
    queueing: Literal["fair", "fifo"] = "fair"
    """Order of the class's waiters: `fair` shares between tenants by weighted fair
    queueing on tokens (prompt x1 + completion x2, tenant `weight`); `fifo` by arrival."""
    on_limit: Literal["reject", "wait"] | None = None
    """Over a tenant limit: `reject` answers 429 at once; `wait` holds the request until
    the tenant's buckets can pay, up to `max_wait_s` (then 429). Default: reject for the
    most urgent class, wait for the others."""
    default_max_tokens: Annotated[int, Field(ge=1)] = 1024
    """Completion tokens charged up front for a request that sets neither `max_tokens` nor
    `max_completion_tokens` (the request itself is not changed; settling corrects it)."""
    on_store_down: Literal["local", "reject"] = "local"
    """When the shared quota store (`guard.quota_store`, Redis) cannot be reached: `local`
    charges this replica's own buckets at each limit divided by `guard.replicas` (the
    replicas together stay within it); `reject` answers 503 with retry-after. Either way
    slots, priorities and fair queueing go on: they never depend on Redis."""
    shadow: bool = False
    """Shadow mode for the class's tenants (unless a tenant says otherwise): their limits
    are charged as if enforced, but a request they would refuse or delay is served at once
    and counted (`vllm_guard_rate_limited_total{action="shadow"}`), with the x-ratelimit-*
    headers it would have had. Watch a limit on real traffic, then enforce it by reload."""


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    priority_class: str = Field(alias="class")
    """The class the tenant's requests get; a request may only choose a less urgent one."""
    api_keys: Annotated[tuple[str, ...], Field(strict=False)] = ()
    """Keys as `env:VAR` (read from that environment variable at load time) or `file:PATH`
    (read from that file at load time, trailing whitespace dropped; relative to the config
    file)."""
    api_key_sha256: Annotated[tuple[str, ...], Field(strict=False)] = ()
    """Keys as lowercase SHA-256 hex digests of the key (`printf %s KEY | sha256sum`)."""
    limits: LimitsConfig | None = None
    """The tenant's quota; unset takes its class's `default_limits` (or none)."""
    weight: Annotated[float, Field(gt=0, strict=False)] = 1.0
    """Share of its class's engine slots when tenants queue (weighted fair queueing)."""
    shadow: bool | None = None
    """Shadow mode for this tenant (see the class's `shadow`); unset: the class's."""
    share_prefix_cache: bool = False
    """By default each tenant gets its own `cache_salt` in vLLM (no tenant can time whether
    another sent a prefix recently). True: the tenant's requests go without one (a
    `cache_salt` the client sends passes unchanged), sharing cached prefixes with every
    other such tenant."""


class GuardConfig(BaseModel):
    model_config = _STRICT

    engine: EngineConfig = EngineConfig()
    guard: GuardSettings = GuardSettings()
    classes: Mapping[Annotated[str, Field(pattern=_NAME)], PriorityClassConfig] = Field(
        min_length=1
    )
    tenants: Mapping[Annotated[str, Field(pattern=_NAME)], TenantConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_check(self) -> GuardConfig:
        for name, tenant in self.tenants.items():
            if tenant.priority_class not in self.classes:
                raise _at(
                    ("tenants", name, "class"),
                    f"unknown class {tenant.priority_class!r}; defined: {', '.join(self.classes)}",
                )
        anon = self.guard.anonymous_tenant
        if anon is not None and anon not in self.tenants:
            raise _at(("guard", "anonymous_tenant"), f"no tenant named {anon!r}")
        priorities = [c.vllm_priority for c in self.classes.values()]
        if len(set(priorities)) != len(priorities):
            raise _at(("classes",), "two classes share a vllm_priority; give each its own")
        reserved_kv = sum(c.reserved_kv for c in self.classes.values())
        if reserved_kv >= self.engine.kv_watermark:
            raise _at(
                ("classes",),
                f"reserved_kv adds up to {reserved_kv:g}, which leaves the least urgent class "
                f"no KV share below engine.kv_watermark={self.engine.kv_watermark:g}",
            )
        reserved = sum(c.reserved_seqs for c in self.classes.values())
        if reserved >= self.engine.max_num_seqs:
            raise _at(
                ("classes",),
                f"reserved_seqs add up to {reserved}, which leaves the least urgent class no "
                f"slot of engine.max_num_seqs={self.engine.max_num_seqs}",
            )
        return self


class _LocatedError(ValueError):
    def __init__(self, loc: tuple[str, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def _at(loc: tuple[str, ...], msg: str) -> _LocatedError:
    return _LocatedError(loc, msg)


# ---------------------------------------------------------------------------------------
# Compiled runtime objects


@dataclass(frozen=True, slots=True)
class CompiledConfig:
    source: str
    max_num_seqs: int
    engine: EngineConfig
    guard: GuardSettings
    classes: tuple[PriorityClass, ...]
    """Most urgent first."""
    classes_by_name: Mapping[str, PriorityClass]
    tenants: Mapping[str, Tenant]
    key_digests: Mapping[bytes, Tenant]
    """SHA-256 digest of an API key -> its tenant."""
    anonymous: Tenant | None
    upstream_api_key: str | None
    engine_key: str | None
    cache_salt_secret: bytes
    """What tenants' prefix-cache salts are derived from (`guard.cache_salt_secret`, or
    random per start)."""
    quota_store_password: str | None
    spec: GuardConfig
    """What this was compiled from: the validated file, with `engine.scheduler` as run."""
    file_spec: GuardConfig | None = None
    """The file as written, where `spec` may differ from it (`run_as`)."""

    def with_scheduler(
        self, scheduler: Literal["vllm", "guard"], env: Mapping[str, str]
    ) -> CompiledConfig:
        """The same file compiled for another `engine.scheduler` (`serve` falls back to
        `vllm`, reserved slots and worst-case KV, when the plugin cannot run)."""
        return self.run_as(self.file_spec or self.spec, scheduler, env)

    def run_as(
        self,
        written: GuardConfig,
        scheduler: Literal["vllm", "guard"] | None,
        env: Mapping[str, str],
    ) -> CompiledConfig:
        """`written` (a file of this guard's, validated) compiled to run with `scheduler`,
        and with this config's salt secret where the file sets none (so vLLM's prefix
        caches stay valid)."""
        engine = written.engine.model_copy(update={"scheduler": scheduler})
        spec = written.model_copy(update={"engine": engine})
        salt = None if written.guard.cache_salt_secret else self.cache_salt_secret
        return compile_config(spec, self.source, env, cache_salt_secret=salt, file_spec=written)


def compile_config(
    cfg: GuardConfig,
    source: str,
    env: Mapping[str, str],
    *,
    cache_salt_secret: bytes | None = None,
    file_spec: GuardConfig | None = None,
) -> CompiledConfig:
    """`cache_salt_secret`: the salt secret where the file sets none (a reload keeps the
    running one; else a random one); `file_spec`: the file as written, where `cfg` was
    changed from it."""
    ordered = sorted(cfg.classes.items(), key=lambda kv: kv[1].vllm_priority)
    classes: list[PriorityClass] = []
    reserved_above = 0
    kv_reserved_above = 0.0
    eng = cfg.engine
    # With the scheduler plugin the engine preempts less urgent work for the most urgent
    # class, so no slot or KV share is held back for it: every class may fill the engine
    # and queue more inside vLLM. Without it, reservations do the job.
    plugin = eng.scheduler == "guard"
    batch_ahead = eng.max_num_seqs if eng.batch_queue_ahead is None else eng.batch_queue_ahead
    for rank, (name, c) in enumerate(ordered):
        if rank == 0:
            slot_limit = eng.max_num_seqs + eng.queue_ahead
        elif plugin:
            slot_limit = eng.max_num_seqs + batch_ahead
        else:
            slot_limit = eng.max_num_seqs - reserved_above
        classes.append(
            PriorityClass(
                name=name,
                rank=rank,
                vllm_priority=c.vllm_priority,
                slot_limit=slot_limit,
                max_queue=c.max_queue,
                max_wait_s=c.max_wait_s,
                header_value=name.encode(),
                default_max_tokens=c.default_max_tokens,
                wait_on_limit=(c.on_limit or ("reject" if rank == 0 else "wait")) == "wait",
                fair_queueing=c.queueing == "fair",
                kv_fraction=eng.kv_watermark - (0.0 if plugin else kv_reserved_above),
                engine_makes_room=plugin and rank == 0,
                kv_admission=not plugin or rank == 0,
                on_store_down=c.on_store_down,
            )
        )
        reserved_above += c.reserved_seqs
        kv_reserved_above += c.reserved_kv
    by_name = {c.name: c for c in classes}

    tenants: dict[str, Tenant] = {}
    digests: dict[bytes, Tenant] = {}
    for tname, t in cfg.tenants.items():
        limits = t.limits or cfg.classes[t.priority_class].default_limits
        tenant = Tenant(
            tname,
            by_name[t.priority_class],
            _compile_limits(limits),
            t.weight,
            t.share_prefix_cache,
            cfg.classes[t.priority_class].shadow if t.shadow is None else t.shadow,
        )
        tenants[tname] = tenant
        for i, ref in enumerate(t.api_keys):
            key = _resolve_secret(ref, env, source, ("tenants", tname, "api_keys", str(i)))
            _add_digest(digests, hashlib.sha256(key.encode()).digest(), tenant, source, tname)
        for i, hexdigest in enumerate(t.api_key_sha256):
            if not _SHA256_HEX.match(hexdigest):
                raise ConfigError(
                    f"{source}: tenants.{tname}.api_key_sha256.{i}: expected 64 lowercase hex "
                    "characters (printf %s KEY | sha256sum)"
                )
            _add_digest(digests, bytes.fromhex(hexdigest), tenant, source, tname)

    upstream_key = cfg.guard.upstream_api_key
    if upstream_key is not None:
        upstream_key = _resolve_secret(upstream_key, env, source, ("guard", "upstream_api_key"))
    engine_key = cfg.guard.engine_key
    if engine_key is not None:
        engine_key = _resolve_secret(engine_key, env, source, ("guard", "engine_key"))
    salt_ref = cfg.guard.cache_salt_secret
    salt_secret = (
        _resolve_secret(salt_ref, env, source, ("guard", "cache_salt_secret")).encode()
        if salt_ref is not None
        else cache_salt_secret or secrets.token_bytes(32)
    )
    store_password = cfg.guard.quota_store_password
    if store_password is not None:
        store_password = _resolve_secret(
            store_password, env, source, ("guard", "quota_store_password")
        )
    anon = tenants[cfg.guard.anonymous_tenant] if cfg.guard.anonymous_tenant else None
    return CompiledConfig(
        source=source,
        max_num_seqs=cfg.engine.max_num_seqs,
        engine=cfg.engine,
        guard=cfg.guard,
        classes=tuple(classes),
        classes_by_name=by_name,
        tenants=tenants,
        key_digests=digests,
        anonymous=anon,
        upstream_api_key=upstream_key,
        engine_key=engine_key,
        cache_salt_secret=salt_secret,
        quota_store_password=store_password,
        spec=cfg,
        file_spec=file_spec,
    )


def _compile_limits(cfg: LimitsConfig | None) -> Limits | None:
    if cfg is None:
        return None
    limits = Limits(
        requests_per_minute=cfg.requests_per_minute,
        tokens_per_minute=cfg.tokens_per_minute,
        tokens_per_day=cfg.tokens_per_day,
        max_concurrent=cfg.max_concurrent,
        burst={str(dim): cap for dim, cap in cfg.burst.items()} or None,
    )
    return None if limits.empty else limits


def _add_digest(
    digests: dict[bytes, Tenant], digest: bytes, tenant: Tenant, source: str, tname: str
) -> None:
    other = digests.get(digest)
    if other is not None and other is not tenant:
        raise ConfigError(
            f"{source}: tenants.{tname}: an API key is also a key of tenant {other.name!r}; "
            "every key must identify one tenant"
        )
    digests[digest] = tenant


def _resolve_secret(ref: str, env: Mapping[str, str], source: str, loc: tuple[str, ...]) -> str:
    """A secret's value from its reference: `env:VARIABLE`, or `file:PATH` (the file's
    content without trailing whitespace, read at each load — a mounted Kubernetes secret;
    a relative PATH is relative to the config file). Errors never show the value."""
    path = ".".join(loc)
    if ref.startswith("file:"):
        return _read_secret_file(ref[5:], source, path)
    if not ref.startswith("env:"):
        raise ConfigError(
            f"{source}: {path}: write the key as env:VARIABLE or file:PATH (or list its SHA-256 "
            "digest under api_key_sha256); plain keys are not accepted in config files"
        )
    var = ref[4:]
    if not _ENV_NAME.match(var):  # perhaps a key written as env:KEY: never print it
        raise ConfigError(f"{source}: {path}: env: must name an environment variable")
    value = env.get(var)
    if not value:
        raise ConfigError(f"{source}: {path}: environment variable {var} is not set or empty")
    return value


def _read_secret_file(name: str, source: str, path: str) -> str:
    file = Path(name)
    if not file.is_absolute() and not source.startswith("<"):
        file = Path(source).parent / file
    try:
        value = file.read_text().rstrip()
    except (OSError, UnicodeDecodeError) as exc:  # the name is not shown: it may be a key
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(
            f"{source}: {path}: file: cannot read the file it names ({reason})"
        ) from None
    if not value:
        raise ConfigError(f"{source}: {path}: file: names an empty file")
    return value


# ---------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> CompiledConfig:
    """Read, validate and compile a limits file; `None` loads the embedded default."""
    if path is None:
        text = resources.files("vllm_guard.defaults").joinpath(DEFAULT_CONFIG).read_text()
        source = f"<embedded {DEFAULT_CONFIG}>"
    else:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    return parse_config(text, source, os.environ if env is None else env)


def parse_config(text: str, source: str, env: Mapping[str, str]) -> CompiledConfig:
    return compile_config(validate_config(text, source), source, env)


def validate_config(text: str, source: str) -> GuardConfig:
    """The file's text validated (nothing resolved or compiled yet)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with keys classes, tenants, engine, guard")
    try:
        cfg = GuardConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    return cfg


# ---------------------------------------------------------------------------------------
# Reloading


def reload_config(running: CompiledConfig, env: Mapping[str, str]) -> CompiledConfig:
    """The file `running` was loaded from, read again for a running guard: tenants, keys
    (`file:` read anew; `env:` from this process's environment, fixed at its start) and
    limits, and class settings other than the classes themselves, compiled as `running`
    runs (its `engine.scheduler`, its salt secret when the file sets none). Raises
    `ConfigError` when the file does not validate, or changes something only a restart
    applies (`restart_only_changes`: engine.*, guard.* but anonymous_tenant, which classes
    exist and their vllm_priority): the error names each such key path."""
    source = running.source
    if source.startswith("<"):
        raise ConfigError(f"{source}: the embedded default cannot change; nothing to reload")
    try:
        text = Path(source).read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    spec = validate_config(text, source)
    changed = restart_only_changes(running.file_spec or running.spec, spec)
    if changed:
        raise ConfigError(
            f"{source}: not reloaded: {'; '.join(changed)}. These take a restart of vllm-guard "
            "(and, for engine settings, a new engine); the running config stays in force."
        )
    return running.run_as(spec, running.spec.engine.scheduler, env)  # the one `serve` chose


_RELOADABLE_SETTINGS = frozenset({("guard", "anonymous_tenant")})
"""Keys of `engine`/`guard` a reload applies (they belong to the tenants' rules)."""


def restart_only_changes(old: GuardConfig, new: GuardConfig) -> list[str]:
    """What differs between two files in the keys only a restart applies, one entry per
    key path (values shown except for secret fields)."""
    changes = []
    for section in ("engine", "guard"):
        before, after = getattr(old, section), getattr(new, section)
        for name in type(before).model_fields:
            a, b = getattr(before, name), getattr(after, name)
            if a != b and (section, name) not in _RELOADABLE_SETTINGS:
                shown = "" if name in _SECRET_FIELDS else f" ({_short(a)} -> {_short(b)})"
                changes.append(f"{section}.{name} changed{shown}")
    added = [c for c in new.classes if c not in old.classes]
    removed = [c for c in old.classes if c not in new.classes]
    parts = [
        f"{verb} {', '.join(names)}"
        for verb, names in (("added", added), ("removed", removed))
        if names
    ]
    if parts:
        changes.append(f"classes {' and '.join(parts)}")
    for name in old.classes:
        if name in new.classes:
            a, b = old.classes[name].vllm_priority, new.classes[name].vllm_priority
            if a != b:
                changes.append(f"classes.{name}.vllm_priority changed ({a} -> {b})")
    return changes


_SECRET_FIELDS = frozenset(
    {
        "api_keys",
        "api_key_sha256",
        "upstream_api_key",
        "engine_key",
        "cache_salt_secret",
        "quota_store",
        "quota_store_password",
    }
)
"""Fields that hold keys or references to them: their values never appear in errors."""


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _LocatedError):
            loc, msg = loc + ctx_err.loc, ctx_err.msg  # loc: where the failing model sits
        elif err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            msg = f"unknown key {loc[-1]!r}" + (
                f"; allowed here: {', '.join(allowed)}" if allowed else ""
            )
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif _SECRET_FIELDS.isdisjoint(loc):
            msg = f"{err['msg']} (got {_short(err.get('input'))})"
        else:  # a key pasted where a reference belongs: say where, never what
            msg = f"{err['msg']} (the value is not shown: it may be a key)"
        lines.append(f"  {'.'.join(loc) or '(top level)'}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[str, ...]) -> list[str]:
    """The keys a model accepts at `loc`, walking the schema (mapping names are skipped)."""
    model: type[BaseModel] = GuardConfig
    i = 0
    while i < len(loc):
        field = model.model_fields.get(loc[i])
        if field is None:
            return []
        i += 1
        ann = field.annotation
        if loc[i - 1] in ("classes", "tenants"):
            i += 1  # skip the class/tenant name
            ann = PriorityClassConfig if loc[i - 2] == "classes" else TenantConfig
        if loc[i - 1] in ("limits", "default_limits"):
            ann = LimitsConfig
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return [f.alias or name for name, f in model.model_fields.items()]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
