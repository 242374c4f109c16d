"""`vllm-guard tune` checks the stack and both keys before it sends any load."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import BASE_CONFIG, KEYS
from vllm_guard.config import parse_config
from vllm_guard.loadtest import preflight

SOURCE = Path("limits.yaml")


class _Guard(BaseHTTPRequestHandler):
    """A stand-in guard: /health as `health`, /v1/models for the keys in `accepted`."""

    health = 200
    accepted: set[str] = set()

    def do_GET(self) -> None:
        if self.path == "/health":
            status = self.health
        else:
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            status = 200 if key in self.accepted else 401
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def guard() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Guard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Guard.health, _Guard.accepted = 200, set(KEYS.values())
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


CONFIG = parse_config(BASE_CONFIG, "limits.yaml", KEYS)
GOOD = [("--interactive-key", KEYS["CHAT_UI_KEY"]), ("--batch-key", KEYS["ETL_KEY"])]


def test_a_reachable_guard_that_takes_both_keys_passes(guard):
    assert preflight.problem(guard, CONFIG, SOURCE, GOOD) is None


def test_nothing_listening_is_named_before_any_load():
    said = preflight.problem("http://127.0.0.1:9", CONFIG, SOURCE, GOOD)
    assert said is not None and said.startswith("cannot reach the guard at http://127.0.0.1:9")


def test_an_engine_not_ready(guard):
    _Guard.health = 503
    said = preflight.problem(guard, CONFIG, SOURCE, GOOD)
    assert said is not None and "answered 503" in said and "not ready" in said


def test_a_key_of_no_tenant_in_the_config(guard):
    keys = [GOOD[0], ("--batch-key", "not-a-configured-key")]
    assert preflight.problem(guard, CONFIG, SOURCE, keys) == (
        "--batch-key is not a key of any tenant in limits.yaml"
    )


def test_a_guard_that_runs_other_keys(guard):
    _Guard.accepted = {KEYS["CHAT_UI_KEY"]}
    said = preflight.problem(guard, CONFIG, SOURCE, GOOD)
    assert said is not None and said.startswith("the guard at") and "--batch-key (401)" in said
    assert KEYS["ETL_KEY"] not in said  # never the key itself
