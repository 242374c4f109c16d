"""Locust users for vllm-guard (or vLLM directly): interactive chat and batch.

`benchmarks/locustfile.py` exposes them to the `locust` command; `vllm-guard tune` drives
them as a library. Importing this module imports Locust, which monkey-patches the
standard library with gevent: keep it out of asyncio processes.

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 --headless \\
        -u 20 -r 20 -t 60s --csv results/locust/run \\
        --interactive-key "$CHAT_UI_KEY" --batch-key "$ETL_KEY"

Against vLLM directly add `--direct` (the classes' priorities go in the body instead of
coming from the tenants) and drop the keys. Without --headless it serves the web UI.

- `InteractiveUser`: short streaming chat requests; records `TTFT` (until the first
  `data:` event) as a Locust entry of its own, next to the request's total time.
- `BatchUser`: long non-streaming completions (`--batch-max-tokens`, default 256,
  `ignore_eos` so every request is that long); counts the output tokens.

Weights: `--interactive-weight`, `--batch-weight` (or `--interactive-users N` for a fixed
count); think times `--interactive-wait` and `--batch-wait` (seconds, "min,max").
"""

from __future__ import annotations

import json
import time
from typing import Any

from locust import HttpUser, between, events, task

TTFT = "TTFT"
counters = {"batch_tokens": 0, "batch_requests": 0}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--interactive-key", default="", help="interactive tenant's API key")
    parser.add_argument("--batch-key", default="", help="batch tenant's API key")
    parser.add_argument("--model", default="tiny", help="model name (default tiny)")
    parser.add_argument("--direct", action="store_true", help="target is vLLM, not the guard")
    parser.add_argument("--interactive-max-tokens", type=int, default=16)
    parser.add_argument("--batch-max-tokens", type=int, default=256)
    parser.add_argument("--interactive-wait", default="0.5,1.0", help="think time min,max (s)")
    parser.add_argument("--batch-wait", default="0,0", help="think time min,max (s)")
    parser.add_argument("--interactive-weight", type=int, default=1)
    parser.add_argument("--batch-weight", type=int, default=1)
    parser.add_argument("--interactive-users", type=int, default=0, help="fixed count (0: weight)")


@events.init.add_listener
def _configure(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    InteractiveUser.configure(opts)
    BatchUser.configure(opts)


def _wait(spec: str) -> Any:
    low, high = (float(x) for x in spec.split(","))
    return between(low, high)


class _Base(HttpUser):
    abstract = True
    key = ""
    model = "tiny"
    priority: int | None = None  # body priority when sending straight to vLLM

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def _body(self, body: dict[str, Any]) -> dict[str, Any]:
        body["model"] = self.model
        if self.priority is not None:
            body["priority"] = self.priority
        return body


class InteractiveUser(_Base):
    wait_time = between(0.5, 1.0)
    max_tokens = 16

    @classmethod
    def configure(cls, opts: Any) -> None:
        cls.key = opts.interactive_key
        cls.model = opts.model
        cls.priority = 0 if opts.direct else None
        cls.max_tokens = opts.interactive_max_tokens
        cls.wait_time = _wait(opts.interactive_wait)
        cls.weight = opts.interactive_weight
        cls.fixed_count = opts.interactive_users

    @task
    def chat(self) -> None:
        body = self._body(
            {
                "messages": [{"role": "user", "content": "How is the queue today?"}],
                "max_tokens": self.max_tokens,
                "stream": True,
            }
        )
        start = time.perf_counter()
        first = None
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=self._headers(),
            stream=True,
            catch_response=True,
            name="interactive chat (total)",
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            for line in resp.iter_lines():
                if first is None and line.startswith(b"data: "):
                    first = time.perf_counter()
            resp.success()
        if first is not None:
            self.environment.events.request.fire(
                request_type=TTFT,
                name="interactive",
                response_time=(first - start) * 1000,
                response_length=0,
                exception=None,
                context={},
            )


class BatchUser(_Base):
    wait_time = between(0, 0)
    max_tokens = 256

    @classmethod
    def configure(cls, opts: Any) -> None:
        cls.key = opts.batch_key
        cls.model = opts.model
        cls.priority = 10 if opts.direct else None
        cls.max_tokens = opts.batch_max_tokens
        cls.wait_time = _wait(opts.batch_wait)
        cls.weight = opts.batch_weight

    @task
    def complete(self) -> None:
        body = self._body(
            {"prompt": "Summarise the nightly report.", "max_tokens": self.max_tokens,
             "ignore_eos": True}
        )  # fmt: skip
        with self.client.post(
            "/v1/completions",
            json=body,
            headers=self._headers(),
            catch_response=True,
            name="batch completion",
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                tokens = json.loads(resp.content)["usage"]["completion_tokens"]
            except (ValueError, KeyError, TypeError):
                resp.failure("no usage in the answer")
                return
            counters["batch_tokens"] += tokens
            counters["batch_requests"] += 1
            resp.success()
