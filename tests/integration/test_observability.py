"""The dashboard and alerts against a real Prometheus scraping the real stack.

Prometheus (Debian's package) runs on loopback with the project's own
configs/prometheus/prometheus.yml pointed at this session's guard and scraping every
second, and configs/prometheus/alerts.yml with every `for:` set to 0s (the rules
themselves unchanged), so a provoked condition fires within seconds. Traffic of every
kind goes through the guard; then every query of every panel of
configs/grafana/vllm-guard.json must return data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from vllm_guard.engine.launcher import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "configs" / "grafana" / "vllm-guard.json"
# Panels of other stacks: the plugin's (test_scheduler_plugin) and Redis's
# (test_shared_limits); the session's stack runs neither.
PLUGIN_PANELS = ("Scheduler plugin:", "Quota store")
ALERTS = ROOT / "configs" / "prometheus" / "alerts.yml"
PROMETHEUS_YML = ROOT / "configs" / "prometheus" / "prometheus.yml"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:  # .ci/run installs it; say so rather than skip silently
        pytest.fail(f"{tool} not found: install Debian's prometheus package (scripts/install.sh)")
    return path


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    binary = _need("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    guard = stack.metrics_url.removeprefix("http://")
    assert guard != stack.url.removeprefix("http://")  # the session's stack has a metrics port
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [guard]}]
    config["rule_files"] = [str(work / "alerts.yml")]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    (work / "alerts.yml").write_text(re.sub(r"for: \S+", "for: 0s", ALERTS.read_text()))
    port = free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus not ready in 60 s"
            time.sleep(0.3)
        # Ready is not scraped: traffic sent before the first scrape of the guard would be
        # in the counters' first samples, and rate() would never see it.
        while not _query(url, 'up{job="vllm-guard"} == 1'):
            assert time.monotonic() < deadline, "prometheus did not scrape the guard in 60 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _query(prom: str, expr: str) -> list[dict]:
    resp = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        if panel["title"].startswith(PLUGIN_PANELS):
            continue  # not on the session's stack: see PLUGIN_PANELS
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$__rate_interval", "30s")
                .replace("$tenant", ".*")
                .replace("$class", ".*")
            )
            out.append((panel["title"], expr))
    return out


def _traffic(stack) -> None:
    """Every kind the panels show: streamed interactive chat (TTFT), batch, requests a
    limit refuses. The token panels' series exist from the start (at 0), and the
    token-metered tenant is left alone: test_quota counts its day budget from full."""
    chat = stack.client()
    for _ in range(3):
        stream = chat.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            stream=True,
        )
        assert sum(1 for _ in stream) > 0
    stack.client("ETL_KEY").completions.create(model="tiny", prompt="x", max_tokens=4)
    metered = stack.client("METERED_KEY")
    refused = 0
    for _ in range(10):  # one per 2 s is allowed; spread over scrapes, so rate() sees it
        try:
            metered.completions.create(model="tiny", prompt="x", max_tokens=1)
        except openai.RateLimitError:
            refused += 1
        time.sleep(0.6)
    assert refused >= 4


def test_every_dashboard_query_returns_data_and_a_provoked_alert_fires(stack, prometheus):
    _traffic(stack)
    queries = _panel_queries()
    assert len(queries) >= 16
    deadline = time.monotonic() + 30
    empty = queries
    while empty and time.monotonic() < deadline:
        time.sleep(2)
        empty = [(title, expr) for title, expr in empty if not _query(prometheus, expr)]
    assert not empty, f"panels without data: {empty}"

    # The metered tenant's hit rate is far above 20%: with `for: 0s` the alert fires.
    deadline = time.monotonic() + 30
    firing: list[dict] = []
    while not firing and time.monotonic() < deadline:
        alerts = httpx.get(prometheus + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        firing = [
            a
            for a in alerts
            if a["labels"]["alertname"] == "VllmGuardRateLimitHitRateHigh"
            and a["labels"].get("tenant") == "metered"
            and a["state"] == "firing"
        ]
        time.sleep(1)
    rules = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()
    targets = httpx.get(prometheus + "/api/v1/targets", timeout=10).json()
    parts = {  # the alert's two rates, to tell a missing series from a low ratio
        e: _query(prometheus, e)
        for e in (
            'sum by (tenant) (rate(vllm_guard_rate_limited_total{action!="shadow"}[5m]))',
            "sum by (tenant) (rate(vllm_guard_tenant_requests_total[5m]))",
        )
    }
    assert firing, (
        f"VllmGuardRateLimitHitRateHigh did not fire for metered: {parts} {rules} {targets}"
    )
    # ... and the quiet ones do not: nothing is stale, the engine is up.
    names = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
    assert not names & {"VllmGuardEngineMetricsStale", "VllmGuardEngineDown"}


def test_alert_rules_pass_promtool():
    promtool = _need("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout
