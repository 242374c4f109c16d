"""The request fuzzer (tests/fuzz_requests.py) against the real stack, shorter than the
unit run: real sockets, the real vLLM answering what gets through. Every answer is
well-formed and no 500; after every case the guard holds nothing, and after the run
vLLM runs and waits for nothing."""

from __future__ import annotations

import time

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings

from tests.fuzz_requests import FuzzCase, fuzz_cases
from tests.integration.conftest import KEYS
from tests.unit.test_fuzz import check_answer

pytestmark = pytest.mark.integration

_KEYS = {
    "chat": b"Bearer " + KEYS["CHAT_UI_KEY"].encode(),
    "etl": b"Bearer " + KEYS["ETL_KEY"].encode(),
}


def _send(client: httpx.Client, case: FuzzCase) -> tuple[int, dict[str, str], bytes, bool]:
    headers = [(k, v) for k, v in case.headers if k != b"content-length"]  # httpx sets it
    request = client.build_request("POST", case.path, headers=headers, content=case.body)
    response = client.send(request, stream=True)
    try:
        body = b""
        for chunk in response.iter_raw():
            body += chunk
            if case.leave_early:
                return response.status_code, dict(response.headers), body, False
        return response.status_code, dict(response.headers), body, True
    finally:
        response.close()


def _sendable(case: FuzzCase) -> bool:
    """httpx (h11) refuses control characters and surrounding whitespace in header values
    (the unit fuzzer sends those)."""
    return all(
        v == v.strip(b" \t") and not any(b < 0x20 or b == 0x7F for b in v) for _, v in case.headers
    )


def _guard_holds_nothing(stack) -> None:
    deadline = time.monotonic() + 10
    while True:  # the guard settles just after the client has its answer
        held = stack.guard_metric("vllm_guard_in_flight") + stack.guard_metric(
            "vllm_guard_queue_depth"
        )
        if held == 0:
            return
        assert time.monotonic() < deadline, f"the guard still holds {held}"
        time.sleep(0.05)


# derandomize: the same 60 cases in every CI run (the unit fuzzer explores; this one checks
# that what passes there also passes on the real engine).
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=fuzz_cases(_KEYS))
def test_fuzzed_requests_through_the_real_stack(stack, case):
    assume(_sendable(case))
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        status, headers, body, complete = _send(client, case)
    check_answer(status, headers, body, complete)
    _guard_holds_nothing(stack)


def test_after_the_fuzzer_vllm_is_idle(stack):
    stack.wait_idle(30)
