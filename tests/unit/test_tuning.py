"""`vllm-guard tune`'s decisions, on made-up sweeps (the sweep itself needs a real stack)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import KEYS
from vllm_guard.config import load_config
from vllm_guard.loadtest.recommend import (
    knee_reached,
    plan,
    plots,
    recommend,
    report,
    write_config,
)


def _step(batch_users, p95, tps, inflight=1.0):
    return {
        "batch_users": batch_users, "interactive_users": 4, "ttft_p50_ms": p95 / 2,
        "ttft_p95_ms": p95, "batch_tokens_per_s": tps, "queue_depth_max": {},
        "interactive_in_flight_max": inflight, "kv_reserved_max": 0.0,
    }  # fmt: skip


def test_knee_is_the_objective_or_a_throughput_plateau():
    assert not knee_reached([_step(2, 40, 500)], 100)
    assert knee_reached([_step(2, 40, 500), _step(4, 140, 900)], 100)  # over the objective
    assert knee_reached([_step(2, 40, 500), _step(4, 50, 510)], 100)  # +2 %: plateau
    assert not knee_reached([_step(2, 40, 500), _step(4, 50, 900)], 100)


def test_recommends_the_best_step_that_meets_the_objective():
    steps = [_step(2, 40, 500, 1), _step(4, 60, 900, 2.0), _step(8, 300, 1300, 3)]
    rec = recommend(steps, objective_ms=100, reserved_now=1, slots=16)
    assert rec is not None
    assert rec["max_concurrent"] == 4
    assert rec["tokens_per_minute"] == 64800  # 900 tokens/s x 60 x 1.2, rounded up to 100
    assert rec["reserved_seqs"] == 3  # interactive peak in flight 2, plus one
    assert recommend([_step(2, 400, 500)], 100, 0, 16) is None


WHOLE = """
engine: {max_num_seqs: 16}
classes:
  interactive: {vllm_priority: 0, reserved_seqs: 1, max_queue: 100, max_wait_s: 5}
  batch:
    vllm_priority: 10
    max_wait_s: 60
    default_limits: {requests_per_minute: 600}
  bulk: {vllm_priority: 20, max_wait_s: 300}
tenants:
  chat-ui: {class: interactive, api_keys: ["env:CHAT_UI_KEY"]}
  nightly-etl: {class: batch, api_keys: ["env:ETL_KEY"], weight: 3}
  reports:
    class: bulk
    api_keys: ["env:REPORTS_KEY"]
    limits: {tokens_per_day: 5000000, max_concurrent: 50}
"""


def _whole(tmp_path: Path, monkeypatch) -> Path:
    for var, value in {**KEYS, "REPORTS_KEY": "reports-secret"}.items():
        monkeypatch.setenv(var, value)
    src = tmp_path / "in.yaml"
    src.write_text(WHOLE)
    return src


def test_tunes_every_batch_tenant_by_weight_and_every_queue(tmp_path: Path, monkeypatch):
    src = _whole(tmp_path, monkeypatch)
    step = {**_step(8, 60, 1000, 2.0), "batch_requests_per_s": 4.0}
    rec = recommend([_step(4, 40, 600), step], 100, 1, 16)
    assert rec is not None and rec["max_concurrent"] == 8
    changes = plan(yaml.safe_load(WHOLE), rec, 100, plugin=False)
    tuned = {".".join(path): value for path, value, _ in changes}
    assert tuned == {
        "classes.interactive.reserved_seqs": 3,  # peak 2 in flight + 1
        # Weights 3 : 1 of 8 requests in flight and 1.2 x 60,000 tokens/min.
        "tenants.nightly-etl.limits.max_concurrent": 6,
        "tenants.nightly-etl.limits.tokens_per_minute": 54000,
        "tenants.reports.limits.max_concurrent": 2,
        "tenants.reports.limits.tokens_per_minute": 18000,
        # 4 batch requests/s drained x max_wait_s (interactive's queue is left as it is).
        "classes.batch.max_queue": 240,
        "classes.bulk.max_queue": 1200,
    }
    out = tmp_path / "out"
    out.mkdir()
    path = write_config(src, out, changes, "tuned in a test\nsecond line")
    text = path.read_text()
    assert text.startswith("# tuned in a test\n# second line\n")
    line = next(x for x in text.splitlines() if x.strip().startswith("tokens_per_minute: 54000"))
    assert "# tuned: 75% (weight 3 of 4) of 1.2 x the 60000 batch tokens/min" in line
    config = load_config(path)
    etl = config.tenants["nightly-etl"].limits
    # Its class's default_limits became its own, with the tuned keys added.
    assert etl is not None and etl.requests_per_minute == 600 and etl.max_concurrent == 6
    reports = config.tenants["reports"].limits
    assert reports is not None and reports.tokens_per_day == 5000000  # kept
    assert config.classes_by_name["batch"].slot_limit == 16 - 3
    assert config.tenants["chat-ui"].limits is None  # the interactive tenant is untouched
    result = {
        "when": "now", "args": {"url": "u", "config": str(src), "interactive_users": 4,
        "interactive_wait": "0.2,0.5", "batch_steps": "4,8", "step_s": 30, "warmup_s": 5,
        "objective_ms": 100}, "steps": [step], "recommendation": rec, "changes": changes,
        "batch_tenant": "nightly-etl", "interactive": "interactive",
    }  # fmt: skip
    assert "| `tenants.reports.limits.max_concurrent` | 2 |" in report(result)
    pytest.importorskip("matplotlib")
    plots([step], 100, tmp_path)
    assert (tmp_path / "tune.png").stat().st_size > 1000


def test_with_the_scheduler_plugin_no_slot_is_reserved(tmp_path: Path, monkeypatch):
    step = {**_step(8, 60, 1000, 2.0), "batch_requests_per_s": 4.0}
    rec = recommend([step], 100, 1, 16)
    assert rec is not None
    changes = plan(yaml.safe_load(WHOLE), rec, 100, plugin=True)
    tuned = {".".join(path): value for path, value, _ in changes}
    assert "classes.interactive.reserved_seqs" not in tuned
    assert tuned["tenants.nightly-etl.limits.max_concurrent"] == 6
