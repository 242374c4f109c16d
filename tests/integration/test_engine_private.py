"""The engine behind `serve` answers nobody but the guard: every route of vLLM's private
port refuses a caller without the per-start key (vLLM's own --api-key would leave
/invocations, /tokenize, /health and /metrics open, and put the key in `ps`)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_every_route_of_the_engine_refuses_a_caller_without_the_guards_key(stack):
    with_key = httpx.get(stack.vllm_url + "/openapi.json", headers=stack.engine_headers, timeout=30)
    assert with_key.status_code == 200
    paths = set(with_key.json()["paths"]) | {"/metrics", "/health", "/invocations", "/tokenize"}
    assert len(paths) > 10
    for template in sorted(paths):
        path = re.sub(r"\{[^}]*\}", "x", template)
        for method in ("GET", "POST"):
            r = httpx.request(
                method, stack.vllm_url + path, json={"model": "tiny", "prompt": "hi"}, timeout=30
            )
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            wrong = httpx.request(
                method, stack.vllm_url + path, headers={"x-vllm-guard-engine-key": "guess"}
            )
            assert wrong.status_code == 401, (method, path)
    assert httpx.get(stack.vllm_url + "/health", headers=stack.engine_headers).status_code == 200
    # ... and the key is not in vLLM's command line, which every local user can read.
    secret = stack.engine_key.encode()
    assert not any(secret in c for c in _command_lines())
    # Through the guard, everything works as before.
    chat = stack.client().completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert chat.choices


def _command_lines() -> list[bytes]:
    out = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # the process ended meanwhile
            out.append(path.read_bytes())
    return out
