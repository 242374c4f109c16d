"""`vllm-guard tune`'s decisions, on made-up sweeps (the sweep itself needs a real stack)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BASE_CONFIG, KEYS
from vllm_guard.config import load_config
from vllm_guard.loadtest.recommend import knee_reached, plots, recommend, report, write_limits


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


def test_writes_a_limits_file_that_loads(tmp_path: Path, monkeypatch):
    for var, value in KEYS.items():
        monkeypatch.setenv(var, value)
    src = tmp_path / "limits.yaml"
    src.write_text(BASE_CONFIG.replace("max_num_seqs: 4", "max_num_seqs: 16"))
    steps = [_step(2, 40, 500), _step(6, 60, 900, 2)]
    rec = recommend(steps, 100, 1, 16)
    assert rec is not None
    path = write_limits(src, tmp_path, rec, "nightly-etl", "interactive")
    config = load_config(path)
    limits = config.tenants["nightly-etl"].limits
    assert limits is not None and limits.max_concurrent == 6
    assert limits.tokens_per_minute == 64800
    assert config.classes_by_name["batch"].slot_limit == 16 - 3
    result = {
        "when": "now", "args": {"url": "u", "config": str(src), "interactive_users": 4,
        "interactive_wait": "0.2,0.5", "batch_steps": "2,6", "step_s": 30, "warmup_s": 5,
        "objective_ms": 100}, "steps": steps, "recommendation": rec,
        "batch_tenant": "nightly-etl", "interactive": "interactive",
    }  # fmt: skip
    assert "max_concurrent **6**" in report(result)
    pytest.importorskip("matplotlib")
    plots(steps, 100, tmp_path)
    assert (tmp_path / "tune.png").stat().st_size > 1000
