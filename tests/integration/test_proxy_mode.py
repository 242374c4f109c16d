"""`vllm-guard proxy`: a second guard in front of the session's already running vLLM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.integration.conftest import CONFIG, KEYS
from vllm_guard.engine.launcher import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def proxy(stack, tmp_path_factory):
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm_guard", "proxy", "--upstream", stack.vllm_url,
        "--config", str(CONFIG), "--port", str(port),
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **KEYS}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # the proxy follows the upstream's /health every 2 s
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_proxy_guards_an_existing_vllm(proxy):
    url, _ = proxy
    with openai.OpenAI(base_url=url + "/v1", api_key=KEYS["ETL_KEY"], max_retries=0) as client:
        raw = client.completions.with_raw_response.create(
            model="tiny", prompt="through the proxy", max_tokens=3, extra_body={"ignore_eos": True}
        )
    assert raw.headers["x-vllm-guard-class"] == "batch"
    assert raw.parse().usage.completion_tokens == 3
    with (
        openai.OpenAI(base_url=url + "/v1", api_key="not-a-key", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()


def test_proxy_says_when_it_cannot_see_the_upstream_policy(proxy):
    _, log = proxy
    # The launcher's vLLM runs without VLLM_SERVER_DEV_MODE, so /server_info is absent.
    assert "cannot read the upstream's scheduling policy" in log.read_text()
