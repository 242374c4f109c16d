"""`vllm-guard proxy`: a second guard in front of the session's already running vLLM."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import CONFIG, KEYS
from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.stack import start_proxy, stop, wait_healthy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def proxy(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("proxy")
    log = work / "proxy.log"
    # The session's vLLM answers only its guard's key: this second guard is given it too.
    config = work / "limits.yaml"
    config.write_text(
        CONFIG.read_text().replace(
            "guard: {", 'guard: {engine_key: "env:VLLM_GUARD_ENGINE_KEY", ', 1
        )
    )
    port = free_port()
    env = {**KEYS, "VLLM_GUARD_ENGINE_KEY": stack.engine_key}
    proc = start_proxy(stack.vllm_url, config, port, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 60, log)  # the proxy follows the upstream's /health every 2 s
        yield url, log
    finally:
        stop(proc)


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
