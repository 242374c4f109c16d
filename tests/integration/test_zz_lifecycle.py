"""Engine crash and recovery, then shutdown. Runs last: it ends the session's stack."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import psutil
import pytest

pytestmark = pytest.mark.integration


def _vllm_child(stack) -> psutil.Process:
    (child,) = [
        p for p in psutil.Process(stack.proc.pid).children() if "vllm" in " ".join(p.cmdline())
    ]
    return child


def test_killed_engine_gives_503_then_recovers(stack):
    with stack.client() as client:
        _kill_engine_and_recover(stack, client)


def _kill_engine_and_recover(stack, client):
    stream = client.completions.create(
        model="tiny", prompt="long", max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
    )
    with stream:
        next(iter(stream))
        old = _vllm_child(stack)
        old.kill()
        # The request in flight ends promptly with an error instead of hanging.
        t0 = time.monotonic()
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 10
    # While vLLM restarts, requests get 503 with retry-after; nothing is held.
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "engine_unavailable"
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert stack.guard_metric("vllm_guard_in_flight") == 0
    # Its whole process group (the engine core too) is gone.
    deadline = time.monotonic() + 15
    while _group_members(old.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _group_members(old.pid) == []
    # Recovery: a new child, healthy again, serving again.
    stack.wait_healthy()
    assert _vllm_child(stack).pid != old.pid
    done = client.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert done.usage.completion_tokens >= 1
    assert stack.guard_metric("vllm_guard_engine_restarts") == 1


def test_sigterm_drains_in_flight_and_leaves_no_orphans(stack):
    vllm = _vllm_child(stack)
    with (
        stack.client() as client,
        client.completions.create(
            model="tiny",
            prompt="drain",
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        ) as stream,
    ):
        it = iter(stream)
        next(it)
        os.kill(stack.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(stack.url + "/health", timeout=2)
        rest = list(it)  # ...but the stream in flight completes
    assert rest and rest[-1].choices[0].finish_reason == "length"
    assert stack.proc.wait(60) == 0
    assert not psutil.pid_exists(vllm.pid) or vllm.status() == psutil.STATUS_ZOMBIE
    assert _group_members(vllm.pid) == []


def _group_members(pgid: int) -> list[int]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return members
