"""Two guard replicas (`vllm-guard proxy`) in front of the session's vLLM, sharing their
tenants' limits through a real Redis; then Redis stopped and started again."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.prometheus import parse_prometheus, total
from vllm_guard.testing.redis_server import RedisServer
from vllm_guard.testing.stack import start_proxy, stop, wait_healthy

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).parents[2] / "configs" / "grafana" / "vllm-guard.json"
KEYS = {
    "SHARED_KEY": "it-shared-key-2c9e",
    "SPARE_KEY": "it-spare-key-51aa",
    "STRICT_KEY": "it-strict-key-f00d",
}
RATE_PER_MIN = 6.0

CONFIG = f"""
engine: {{max_num_seqs: 4, queue_ahead: 2, scheduler: vllm}}
guard:
  engine_key: "env:VLLM_GUARD_ENGINE_KEY"
  quota_store: "{{url}}"
  replicas: 2
classes:
  interactive: {{vllm_priority: 0, reserved_seqs: 1, on_store_down: reject}}
  batch: {{vllm_priority: 10, on_limit: reject, on_store_down: local}}
tenants:
  shared:
    class: batch
    api_keys: ["env:SHARED_KEY"]
    limits: {{requests_per_minute: {RATE_PER_MIN}}}
  spare:  # untouched until Redis is down
    class: batch
    api_keys: ["env:SPARE_KEY"]
    limits: {{requests_per_minute: {RATE_PER_MIN}}}
  strict:
    class: interactive
    api_keys: ["env:STRICT_KEY"]
    limits: {{requests_per_minute: 600}}
"""


@pytest.fixture(scope="module")
def replicas(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("replicas")
    redis = RedisServer().start()
    config = work / "limits.yaml"
    config.write_text(CONFIG.replace("{url}", redis.url))
    env = {**KEYS, "VLLM_GUARD_ENGINE_KEY": stack.engine_key}
    procs, urls = [], []
    try:
        for i in range(2):
            port, log = free_port(), work / f"guard{i}.log"
            procs.append(start_proxy(stack.vllm_url, config, port, env, log))
            urls.append(f"http://127.0.0.1:{port}")
            wait_healthy(urls[-1], procs[-1], 60, log)
        yield urls, redis
    finally:
        for proc in procs:
            stop(proc)
        redis.close()


def _ask(url: str, key: str) -> openai.APIResponse | openai.APIStatusError:
    with openai.OpenAI(base_url=url + "/v1", api_key=KEYS[key], max_retries=0) as client:
        try:
            return client.completions.with_raw_response.create(
                model="tiny", prompt="shared", max_tokens=1
            )
        except openai.APIStatusError as exc:
            return exc


def _metrics(url: str) -> dict:
    return parse_prometheus(httpx.get(url + "/metrics", timeout=10).text)


def test_replicas_together_keep_one_limit(replicas):
    urls, _ = replicas
    started = time.monotonic()
    answers = [_ask(urls[i % 2], "SHARED_KEY") for i in range(16)]
    elapsed = time.monotonic() - started
    served = [a for a in answers if not isinstance(a, openai.APIStatusError)]
    refused = [a for a in answers if isinstance(a, openai.APIStatusError)]
    # Each replica alone would serve 6 (its own full bucket); together they serve 6 plus
    # what refilled while the test ran.
    assert 6 <= len(served) <= 6 + int(elapsed * RATE_PER_MIN / 60) + 1
    assert {a.status_code for a in refused} == {429}
    assert {a.code for a in refused} == {"requests_per_minute"}
    # Both replicas served some, and both refused some: one bucket, two doors.
    assert len({a.http_request.url.port for a in served}) == 2
    assert len({a.request.url.port for a in refused}) == 2


def test_redis_down_local_serves_a_share_reject_answers_503_and_it_recovers(replicas):
    urls, redis = replicas
    redis.stop()
    try:
        strict = _ask(urls[0], "STRICT_KEY")
        assert isinstance(strict, openai.APIStatusError) and strict.status_code == 503
        assert strict.code == "quota_store_unavailable"
        assert int(strict.response.headers["retry-after"]) >= 1
        # `local`: this replica's own bucket at 6/min ÷ 2 replicas = a burst of 3 (for a
        # tenant whose shared bucket was full; one that used it starts from what was left).
        answers = [_ask(urls[1], "SPARE_KEY") for _ in range(5)]
        served = [a for a in answers if not isinstance(a, openai.APIStatusError)]
        assert len(served) == 3
        assert all(a.status_code == 429 for a in answers if isinstance(a, openai.APIStatusError))
        metrics = _metrics(urls[1])
        assert total(metrics, "vllm_guard_quota_store_up") == 0
        fallback = "vllm_guard_quota_store_fallback_total"
        assert total(metrics, fallback, "class=batch", "posture=local") == 5
        assert total(_metrics(urls[0]), fallback, "posture=reject") == 1
    finally:
        redis.start()  # an empty Redis on the same port
    back = time.monotonic()
    for i, url in enumerate(urls):  # each probes every 0.5 s while it is down
        while total(_metrics(url), "vllm_guard_quota_store_up") != 1:
            assert time.monotonic() - back < 5, f"replica {i} did not see Redis back in 5 s"
            time.sleep(0.1)
        answer = _ask(url, "STRICT_KEY")
        assert not isinstance(answer, openai.APIStatusError)


def test_the_dashboards_quota_store_panel_reads_series_the_replicas_export(replicas):
    urls, _ = replicas
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        t["expr"]
        for p in dashboard["panels"]
        if p["title"].startswith("Quota store")
        for t in p["targets"]
    ]
    names = {n for e in exprs for n in re.findall(r"vllm_guard_quota_store_\w+", e)}
    assert len(names) == 3
    exported = {key.split("{", 1)[0] for key in _metrics(urls[0])}
    assert names <= exported, names - exported
