"""Config reload (GuardApp.reload) and shadow mode in the ASGI app, against the fake upstream:
what changes for new requests, what requests under way keep, what a failed reload leaves."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import KEYS
from tests.unit.asgi import Client, call
from tests.unit.conftest import ready_app, until
from vllm_guard.config import ConfigError, load_config, reload_config
from vllm_guard.core.quota import REQUESTS, TOKENS_DAY
from vllm_guard.proxy.app import GuardApp
from vllm_guard.proxy.metrics import render

CONFIG = """
engine: {max_num_seqs: 4}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 1, max_queue: 3, max_wait_s: 5}
  batch: {vllm_priority: 10, max_queue: 5, max_wait_s: 60, on_limit: reject}
tenants:
  chat-ui:
    class: interactive
    api_keys: ["env:CHAT_UI_KEY"]
    limits: {requests_per_minute: 2}
  nightly-etl:
    class: batch
    api_keys: ["env:ETL_KEY"]
    limits: {tokens_per_day: 600, max_concurrent: 2}
"""
ENV = {**KEYS, "NEW_KEY": "new-secret"}
CHAT = {"Authorization": "Bearer chat-secret"}
ETL = {"Authorization": "Bearer etl-secret"}
NEW = {"Authorization": "Bearer new-secret"}
BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


@contextlib.asynccontextmanager
async def _guard(fake, path: Path, text: str) -> AsyncIterator[GuardApp]:
    """The app on `text`, written to `path` (the file a reload reads again)."""
    path.write_text(text)
    app = ready_app(load_config(path, ENV), fake)
    try:
        yield app
    finally:
        await app.upstream.close()


@pytest_asyncio.fixture
async def setup(fake, tmp_path):
    path = tmp_path / "limits.yaml"
    async with _guard(fake, path, CONFIG) as app:
        yield app, path


SHADOW_BATCH = """
engine: {{max_num_seqs: 4}}
classes:
  interactive: {{vllm_priority: 0, reserved_seqs: 1}}
  batch: {{vllm_priority: 10, max_wait_s: {wait}, shadow: true}}
tenants:
  chat-ui: {{class: interactive, api_keys: ["env:CHAT_UI_KEY"]}}
  nightly-etl:
    class: batch
    api_keys: ["env:ETL_KEY"]
    limits: {limits}
"""
"""A batch class in shadow mode, its tenant's `limits` and the class's `wait` filled in."""


def reload(app: GuardApp, path: Path, text: str) -> None:
    path.write_text(text)
    app.reload(ENV)


def limited(app: GuardApp, tenant: str, action: str, dim: str = REQUESTS) -> float:
    """vllm_guard_rate_limited_total for one tenant, dimension and action."""
    labels = f'action="{action}",dimension="{dim}",tenant="{tenant}"'
    return metric(app, f"vllm_guard_rate_limited_total{{{labels}}}")


def metric(app: GuardApp, line_start: str) -> float:
    text = render(app.metrics.registry)[0].decode()
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    ]
    assert len(values) == 1, (line_start, values)
    return values[0]


async def test_a_raised_limit_applies_without_refilling_the_bucket(setup):
    app, path = setup
    for _ in range(2):
        assert (await call(app, "POST", "/v1/completions", CHAT, BODY)).status == 200
    assert (await call(app, "POST", "/v1/completions", CHAT, BODY)).status == 429
    reload(app, path, CONFIG.replace("requests_per_minute: 2", "requests_per_minute: 60"))
    # The bucket kept its level (empty): the reload gave nothing back...
    refused = await call(app, "POST", "/v1/completions", CHAT, BODY)
    assert refused.status == 429
    assert "(limit 60)" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-limit-requests"] == "60"
    # ...and it refills at the new rate: one request a second.
    assert 0 < int(refused.headers["retry-after-ms"]) <= 1000
    assert metric(app, 'vllm_guard_config_reloads_total{result="ok"}') == 1


async def test_a_lowered_limit_clips_the_bucket_and_running_requests_keep_theirs(setup, fake):
    app, path = setup
    fake.mode = "hang"
    client = Client(json.dumps({"prompt": "ab", "max_tokens": 100}).encode())
    running = asyncio.create_task(call(app, "POST", "/v1/completions", ETL, client=client))
    await until(lambda: fake.active == 1)
    gate = app.quota_gates["nightly-etl"]
    bucket = gate.quota.buckets[TOKENS_DAY]
    assert bucket.reserved == 102 and bucket.level == pytest.approx(498, abs=0.1)
    reload(app, path, CONFIG.replace("tokens_per_day: 600", "tokens_per_day: 300"))
    assert app.quota_gates["nightly-etl"] is gate  # same buckets, new limits
    # Clipped so that the level and the running request's hold fit the new capacity.
    assert bucket.capacity == 300 and bucket.level == pytest.approx(300 - 102, abs=0.1)
    assert bucket.reserved == 102  # the running request's hold stays
    client.disconnect()
    await running
    # It settles on the bucket it was charged on (its client left: it pays its estimate).
    assert bucket.reserved == 0 and gate.quota.in_flight == 0
    assert bucket.level == pytest.approx(300 - 102, abs=0.1)


async def test_a_dimension_added_by_reload_is_not_refunded_by_older_requests(setup, fake):
    app, path = setup
    fake.mode = "hang"
    client = Client(json.dumps({"prompt": "ab", "max_tokens": 5}).encode())
    running = asyncio.create_task(call(app, "POST", "/v1/completions", ETL, client=client))
    await until(lambda: fake.active == 1)
    limits = "limits: {tokens_per_day: 600, max_concurrent: 2, requests_per_minute: 10}"
    reload(app, path, CONFIG.replace("limits: {tokens_per_day: 600, max_concurrent: 2}", limits))
    requests = app.quota_gates["nightly-etl"].quota.buckets[REQUESTS]
    assert requests.level == 10 and requests.reserved == 0  # new: full
    client.disconnect()
    await running
    assert requests.level == 10 and requests.reserved == 0  # the old request never touched it


async def test_keys_added_and_removed_by_reload(setup, fake):
    app, path = setup
    assert (await call(app, "POST", "/v1/completions", NEW, BODY)).status == 401
    added = CONFIG + (
        "  new-team:\n    class: batch\n    api_keys: ['env:NEW_KEY']\n"
        "    limits: {requests_per_minute: 1}\n"
    )
    reload(app, path, added)
    assert (await call(app, "POST", "/v1/completions", NEW, BODY)).status == 200
    assert (await call(app, "POST", "/v1/completions", NEW, BODY)).status == 429
    assert limited(app, "new-team", "rejected") == 1

    # A request of the tenant under way when its key is removed finishes; new ones get 401.
    fake.mode = "hang"
    reload(app, path, added.replace("requests_per_minute: 1", "requests_per_minute: 60"))
    await asyncio.sleep(1.1)  # a token back
    client = Client(json.dumps({"prompt": "ab", "max_tokens": 5}).encode())
    running = asyncio.create_task(call(app, "POST", "/v1/completions", NEW, client=client))
    await until(lambda: fake.active == 1)
    reload(app, path, CONFIG)
    assert (await call(app, "POST", "/v1/completions", NEW, BODY)).status == 401
    fake.release.set()
    assert (await running).status == 200
    gate = app._gates["new-team"]
    assert gate.quota.in_flight == 0  # settled on the removed tenant's own gate


async def test_class_settings_reload_and_waiters_keep_their_deadline(setup, fake):
    app, path = setup
    fake.mode = "hang"
    # Three batch requests fill batch's 3 slots (4 minus the one interactive keeps).
    tasks = [asyncio.create_task(call(app, "POST", "/v1/completions", ETL, BODY)) for _ in range(2)]
    await until(lambda: fake.active == 2)
    reload(app, path, CONFIG.replace("reserved_seqs: 1", "reserved_seqs: 2"))
    (batch,) = [c for c in app.config.classes if c.name == "batch"]
    assert batch.slot_limit == 2  # recomputed
    unlimited = CONFIG.replace("{tokens_per_day: 600, max_concurrent: 2}", "{}")
    unlimited = unlimited.replace("reserved_seqs: 1", "reserved_seqs: 2")
    reload(app, path, unlimited.replace("max_queue: 5", "max_queue: 1"))
    queued = asyncio.create_task(call(app, "POST", "/v1/completions", ETL, BODY))
    await until(lambda: app.admission.statistics()[1].queued == 1)
    full = await call(app, "POST", "/v1/completions", ETL, BODY)
    assert full.status == 503
    assert "queue is full (1 requests waiting)" in full.json()["error"]["message"]
    fake.release.set()
    assert [r.status for r in await asyncio.gather(*tasks, queued)] == [200, 200, 200]


async def test_a_waiter_the_lowered_slots_can_never_fit_gets_its_400_at_once(setup, fake):
    """A batch request of n=3 waits for batch's 3 slots; a reload leaves batch 2. It could
    never run: answered 400 at once (as it would be on arrival now), not after max_wait_s,
    and it holds nothing."""
    app, path = setup
    fake.mode = "hang"
    running = asyncio.create_task(call(app, "POST", "/v1/completions", ETL, BODY))
    await until(lambda: fake.active == 1)
    three = asyncio.create_task(call(app, "POST", "/v1/completions", ETL, {**BODY, "n": 3}))
    await until(lambda: app.admission.statistics()[1].queued == 1)
    reload(app, path, CONFIG.replace("reserved_seqs: 1", "reserved_seqs: 2"))
    refused = await asyncio.wait_for(three, 1)
    assert refused.status == 400
    error = refused.json()["error"]
    assert error["param"] == "n" and "runs at most 2 at once" in error["message"]
    assert app.admission.statistics()[1].queued == 0
    assert app.quota_gates["nightly-etl"].quota.in_flight == 1  # the running one only
    fake.release.set()
    assert (await running).status == 200


async def test_the_anonymous_tenant_reloads_with_the_tenants(setup):
    app, path = setup
    assert (await call(app, "POST", "/v1/completions", {}, BODY)).status == 401
    reload(app, path, "guard: {anonymous_tenant: nightly-etl}\n" + CONFIG)
    assert (await call(app, "POST", "/v1/completions", {}, BODY)).status == 200
    reload(app, path, CONFIG)
    assert (await call(app, "POST", "/v1/completions", {}, BODY)).status == 401


async def test_a_file_that_does_not_validate_changes_nothing(setup):
    app, path = setup
    before = app.generation.rules
    with pytest.raises(ConfigError, match=r"tenants\.chat-ui\.limits\.requests_per_minute"):
        reload(app, path, CONFIG.replace("requests_per_minute: 2", "requests_per_minute: -1"))
    assert app.generation.rules is before
    assert metric(app, 'vllm_guard_config_reloads_total{result="failed"}') == 1
    assert metric(app, "vllm_guard_config_last_reload_successful") == 0
    assert (await call(app, "POST", "/v1/completions", CHAT, BODY)).status == 200
    reload(app, path, CONFIG)
    assert metric(app, "vllm_guard_config_last_reload_successful") == 1


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("max_num_seqs: 4", "max_num_seqs: 8"), "engine.max_num_seqs changed (4 -> 8)"),
        (
            ("engine: {", "guard: {quota_store: 'redis://127.0.0.1:1/0'}\nengine: {"),
            "guard.quota_store changed",
        ),
        (("vllm_priority: 10", "vllm_priority: 5"), "classes.batch.vllm_priority changed"),
        (("  batch:", "  bulk: {vllm_priority: 20}\n  batch:"), "classes added bulk"),
    ],
)
async def test_what_needs_a_restart_is_refused_by_name(setup, change, named):
    app, path = setup
    with pytest.raises(ConfigError) as raised:
        reload(app, path, CONFIG.replace(*change))
    assert named in str(raised.value)
    assert "restart" in str(raised.value)
    assert "redis://" not in str(raised.value)  # a store URL may carry a user name


async def test_shadow_mode_serves_counts_and_then_enforces_after_a_reload(setup):
    app, path = setup
    limits = "limits: {requests_per_minute: 2}"
    shadow = CONFIG.replace(limits, limits + "\n    shadow: true")
    reload(app, path, shadow)
    answers = [await call(app, "POST", "/v1/completions", CHAT, BODY) for _ in range(5)]
    assert [a.status for a in answers] == [200] * 5
    remaining = [a.headers["x-ratelimit-remaining-requests"] for a in answers]
    assert remaining == ["1", "0", "0", "0", "0"]  # what enforcement would have said
    assert limited(app, "chat-ui", "shadow") == 3  # what enforcement would have refused
    assert limited(app, "chat-ui", "rejected") == 0
    reload(app, path, CONFIG)  # enforce: the buckets are where shadow mode left them
    assert (await call(app, "POST", "/v1/completions", CHAT, BODY)).status == 429
    assert limited(app, "chat-ui", "rejected") == 1


async def test_shadow_on_a_class_and_a_waiting_class_charges_into_debt(fake, tmp_path):
    limits = "{requests_per_minute: 60, burst: {requests_per_minute: 1}}"
    text = SHADOW_BATCH.format(wait=60, limits=limits)
    async with _guard(fake, tmp_path / "limits.yaml", text) as app:
        started = asyncio.get_running_loop().time()
        answers = [await call(app, "POST", "/v1/completions", ETL, BODY) for _ in range(4)]
        assert asyncio.get_running_loop().time() - started < 1.0  # none waited
        assert [a.status for a in answers] == [200] * 4
        bucket = app._gates["nightly-etl"].quota.buckets[REQUESTS]
        bucket.refill(asyncio.get_running_loop().time())
        # Three would-be delays, each charged: the debt refill pays off when enforcement
        # would have let the last of them in, ~3 s from now.
        assert bucket.level == pytest.approx(-3, abs=0.2)


def test_reload_compiles_as_the_guard_runs_and_reads_key_files_again(tmp_path):
    key = tmp_path / "etl.key"
    key.write_text("first-key\n")
    path = tmp_path / "limits.yaml"
    text = CONFIG.replace('api_keys: ["env:ETL_KEY"]', "api_keys: ['file:etl.key']")
    path.write_text(text)
    loaded = load_config(path, ENV)
    running = loaded.with_scheduler("guard", ENV)  # what `serve` does where the plugin runs
    key.write_text("rotated-key\n")  # a mounted secret, replaced
    new = reload_config(running, ENV)
    assert new.engine.scheduler == "guard"  # as running, though the file leaves it unset
    assert new.classes[1].slot_limit == running.classes[1].slot_limit
    assert new.cache_salt_secret == running.cache_salt_secret  # prefix caches survive
    tenants = {t.name for t in new.key_digests.values()}
    assert tenants == {"chat-ui", "nightly-etl"}
    rotated = hashlib.sha256(b"rotated-key").digest()
    assert new.key_digests[rotated].name == "nightly-etl"
    assert hashlib.sha256(b"first-key").digest() not in new.key_digests
    with pytest.raises(ConfigError, match="nothing to reload"):
        reload_config(load_config(None, ENV), ENV)


def test_shadow_is_the_tenants_own_or_its_classes_and_check_config_says_so(
    tmp_path, monkeypatch, capsys
):
    from vllm_guard.cli import main

    text = CONFIG.replace("on_limit: reject}", "on_limit: reject, shadow: true}")
    text += "  watched:\n    class: batch\n    api_keys: ['env:NEW_KEY']\n    shadow: false\n"
    text = text.replace("tokens_per_day: 600, max_concurrent: 2", "max_concurrent: 2")
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    config = load_config(path, ENV)
    assert config.tenants["nightly-etl"].shadow is True  # its class's
    assert config.tenants["watched"].shadow is False  # its own setting wins
    assert config.tenants["chat-ui"].shadow is False
    for var, value in ENV.items():
        monkeypatch.setenv(var, value)
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tenant nightly-etl: class=batch weight=1 limits=max_concurrent=2 (shadow" in out
    assert "tenant watched: class=batch weight=1 limits=none\n" in out


async def test_a_shadow_request_is_counted_once_though_its_prompt_overdraws_too(fake, tmp_path):
    """A would-be delay on requests whose counted prompt then overdraws the token bucket
    as well: one shadow count for the request, both charges in debt."""
    limits = (
        "{requests_per_minute: 60, tokens_per_minute: 600, "
        "burst: {requests_per_minute: 1, tokens_per_minute: 12}}"
    )
    text = SHADOW_BATCH.format(wait=600, limits=limits)
    async with _guard(fake, tmp_path / "limits.yaml", text) as app:
        body = {"model": "tiny", "prompt": "hi there", "max_tokens": 4}
        for _ in range(2):
            assert (await call(app, "POST", "/v1/completions", ETL, body)).status == 200
        shadowed = limited(app, "nightly-etl", "shadow") + limited(
            app, "nightly-etl", "shadow", "tokens_per_minute"
        )
        assert shadowed == 1  # the second request (the first fits: 8 + 4 tokens), once
        quota = app._gates["nightly-etl"].quota
        loop_now = asyncio.get_running_loop().time()
        for bucket in quota.buckets.values():
            bucket.refill(loop_now)
        assert quota.buckets[REQUESTS].level < 0 and quota.buckets["tokens_per_minute"].level < 0
