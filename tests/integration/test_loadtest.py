"""Locust against the real stack: the locustfile headless, and `vllm-guard tune --measure`.

Short runs: they show the load tools work end to end (TTFT recorded, batch tokens
counted, CSV and JSON written); the capacity sweep itself is benchmarks/tune_check.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import CONFIG, KEYS
from vllm_guard.config import load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_locustfile_headless_records_ttft_and_batch_requests(stack, tmp_path):
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "locustfile.py"),
        "--host", stack.url, "--headless", "-u", "3", "-r", "3", "-t", "6s",
        "--csv", str(tmp_path / "run"), "--only-summary",
        "--interactive-key", KEYS["CHAT_UI_KEY"], "--batch-key", KEYS["ETL_KEY"],
        "--batch-max-tokens", "16", "--interactive-wait", "0.1,0.2",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    ttft = rows[("TTFT", "interactive")]
    assert int(ttft["Request Count"]) > 0 and float(ttft["Median Response Time"]) > 0
    assert int(rows[("POST", "interactive chat (total)")]["Failure Count"]) == 0
    assert int(rows[("POST", "batch completion")]["Request Count"]) > 0


def test_tune_measure_drives_locust_as_a_library(stack, tmp_path):
    cmd = [
        sys.executable, "-m", "vllm_guard", "tune", "--url", stack.url, "--config", str(CONFIG),
        "--interactive-key", KEYS["CHAT_UI_KEY"], "--batch-key", KEYS["ETL_KEY"],
        "--objective-ms", "60000", "--interactive-users", "2", "--measure", "2",
        "--step-s", "4", "--warmup-s", "1", "--batch-max-tokens", "16", "--out", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, **KEYS}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "measure.json").read_text())
    step = result["steps"][0]
    assert result["objective_met"] is True
    assert step["ttft_n"] > 0 and step["ttft_p95_ms"] > 0
    assert step["batch_requests"] > 0 and step["batch_tokens_per_s"] > 0
    assert KEYS["CHAT_UI_KEY"] not in done.stdout + done.stderr  # keys are never printed


def test_tune_sweeps_and_tunes_the_whole_config(stack, tmp_path):
    """A short sweep against the session's stack tunes every batch tenant of its config,
    the interactive class's reservation and the queues, and writes a file that loads."""
    cmd = [
        sys.executable, "-m", "vllm_guard", "tune", "--url", stack.url,
        "--metrics-url", stack.metrics_url, "--config", str(CONFIG),
        "--interactive-key", KEYS["CHAT_UI_KEY"], "--batch-key", KEYS["ETL_KEY"],
        "--objective-ms", "60000", "--interactive-users", "1", "--batch-steps", "1,2",
        "--step-s", "4", "--warmup-s", "1", "--batch-max-tokens", "16", "--out", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, **KEYS}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "keys tuned" in done.stdout
    result = json.loads((tmp_path / "tune.json").read_text())
    assert result["plugin"] is False  # the session's stack runs engine.scheduler: vllm
    step = result["recommendation"]["step"]
    # (The interactive in-flight peak is sampled once a second: short chats may fall between.)
    assert step["batch_requests_per_s"] > 0 and step["ttft_n"] > 0
    tuned = {".".join(path) for path, _, _ in result["changes"]}
    batch_tenants = {"nightly-etl", "bulk-flood", "bulk-trickle", "batch-runner"}
    assert tuned >= {f"tenants.{t}.limits.max_concurrent" for t in batch_tenants}
    assert tuned >= {f"tenants.{t}.limits.tokens_per_minute" for t in batch_tenants}
    assert "classes.interactive.reserved_seqs" in tuned
    assert "classes.batch.max_queue" in tuned
    text = (tmp_path / "limits.yaml").read_text()
    assert text.startswith("# Written by vllm-guard tune")
    assert text.count("# tuned: ") == len(result["changes"])
    config = load_config(tmp_path / "limits.yaml", KEYS)
    runner = config.tenants["batch-runner"].limits
    assert runner is not None and runner.requests_per_minute == 3000  # kept
    assert runner.max_concurrent is not None and runner.tokens_per_minute is not None
    assert "| `classes.interactive.reserved_seqs` |" in (tmp_path / "report.md").read_text()
