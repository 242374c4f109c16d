"""`vllm-guard batch` and its client against the real guard + vLLM.

The tenant `batch-runner` may send 3000 requests/min with a burst of 5 and its class
answers 429 (no waiting in the guard), so a 500-line file meets rate limits for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import KEYS
from vllm_guard.client.batch import Runner, check_input, parse_lines
from vllm_guard.client.limited import LimitedClient

pytestmark = pytest.mark.integration

TOO_LONG = {5, 123, 499}  # lines whose max_tokens exceeds the model's length: vLLM says 400


def _write_input(path: Path, n: int, bad: set[int] = frozenset()) -> None:
    with path.open("w") as f:
        for i in range(n):
            body = {"model": "tiny", "prompt": f"item {i}", "max_tokens": 2}
            if i in bad:
                body["max_tokens"] = 100_000
            rec = {"custom_id": f"item-{i}", "method": "POST", "url": "/v1/completions"}
            f.write(json.dumps({**rec, "body": body}) + "\n")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_500_lines_under_tight_limits_each_exactly_once_retrying_as_told(stack, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 500, TOO_LONG)
    total, errors = check_input(src)
    assert (total, errors) == (500, [])

    async def run() -> LimitedClient:
        client = LimitedClient(
            stack.url, KEYS["BATCH_RUNNER_KEY"], max_concurrency=32, initial_concurrency=32
        )
        with out.open("a") as f:
            await Runner(client, f, 32, total, 0).run(
                item for item in parse_lines(src) if not isinstance(item, str)
            )
        await client.close()
        return client

    client = asyncio.run(run())
    records = _records(out)
    assert sorted(r["custom_id"] for r in records) == sorted(f"item-{i}" for i in range(500))
    failed = {r["custom_id"] for r in records if r["error"] is not None}
    assert failed == {f"item-{i}" for i in TOO_LONG}
    for r in records:
        if r["custom_id"] in failed:  # vLLM's own error body, not a guard or client one
            assert r["response"]["status_code"] == 400
            assert "max_tokens" in json.dumps(r["response"]["body"]["error"])
        else:
            assert r["response"]["status_code"] == 200
            assert r["response"]["body"]["choices"]

    stats = client.stats
    assert stats.rate_limited > 0, "the limits never bit: the test proves nothing"
    advertised = [e for e in stats.retry_log if e.status == 429]
    assert advertised and all(e.advertised_s is not None for e in advertised)
    # No retry went out before the server's retry-after-ms allowed it.
    early = [e for e in advertised if e.sent_at - e.refused_at < e.advertised_s - 0.001]
    assert early == []
    assert client.limits["requests"] == 3000  # learned from x-ratelimit-limit-requests


def test_sigkill_mid_file_then_resume_gives_every_line_exactly_once(stack, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 300)
    cmd = [
        sys.executable, "-m", "vllm_guard", "batch", str(src), "-o", str(out),
        "--base-url", stack.url, "--workers", "16", "--no-progress",
        "--class", "metered-batch",  # its own class; the default, batch, is more urgent: 403
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": KEYS["BATCH_RUNNER_KEY"]}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 60) and time.monotonic() < deadline:
        assert proc.poll() is None, "the runner ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = out.read_text().count("\n")
    assert 60 <= first < 300

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    ids = [r["custom_id"] for r in _records(out)]
    assert sorted(ids) == sorted(f"item-{i}" for i in range(300))  # once each, none torn
    assert f"{first} from before" in resumed.stderr  # whole lines only; a torn one is redone
