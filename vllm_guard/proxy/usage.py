"""What a request cost, after the fact: vLLM's `usage`.

A stream asks vLLM for usage (`stream_options.include_usage`) even when the client did not;
`UsageTap` reads it from the final chunk and removes that chunk when the client had not
asked for it. A stream cut off before its usage chunk is settled as prompt tokens + one
token per content event streamed (vLLM sends one event per decoded step, so this is exact
without speculative decoding and an upper bound with it).
"""

from __future__ import annotations

import re
from typing import Any

from vllm_guard.core.cost import Estimate
from vllm_guard.upstream.answers import count, dig, parse_json

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def usage_total(usage: Any) -> int | None:
    if isinstance(usage, dict):
        return count(usage.get("total_tokens"))
    return None


class UsageTap:
    """Passes an SSE stream through event by event, noting the usage chunk and counting
    content events; drops the usage chunk when the client did not ask for it."""

    __slots__ = ("_buffer", "_keep_usage", "events", "usage")

    def __init__(self, keep_usage: bool) -> None:
        self._keep_usage = keep_usage
        self._buffer = b""
        self.events = 0
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._buffer + chunk if self._buffer else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data
            return b""
        self._buffer = data[end + 2 :]
        complete = data[: end + 2]
        if _USAGE_OBJECT.search(complete) is None:
            self.events += complete.count(b"data: {")
            return complete
        out = []
        for event in complete.split(b"\n\n")[:-1]:
            if self._is_usage_only(event):
                if not self._keep_usage:
                    continue
            elif event.startswith(b"data: {"):
                self.events += 1
            out.append(event + b"\n\n")
        return b"".join(out)

    def _is_usage_only(self, event: bytes) -> bool:
        if not event.startswith(b"data: {") or _USAGE_OBJECT.search(event) is None:
            return False
        obj = parse_json(event[6:])
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if not isinstance(usage, dict):
            return False
        if obj.get("choices"):
            # continuous usage stats: usage rides on a content chunk; keep the latest.
            self.usage = usage
            return False
        self.usage = usage
        return True

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest


def asked_for_usage(payload: dict[str, Any]) -> bool:
    """The client asked for the stream's usage chunk itself."""
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def usage_of_body(data: bytes) -> int | None:
    """`usage.total_tokens` of a whole (non-streamed) answer, if it has one."""
    return usage_total(dig(parse_json(data), "usage"))


class RequestUsage:
    """What forwarding learned about a request's real cost, for settling its quota (and
    the body bytes it counts against the waiting budget until it is admitted).

    Charged when vLLM gave no usage: a stream that was cut off pays its prompt plus one
    token per content event streamed; a request vLLM may have worked on without saying
    how much (no answer, a client that left before a non-streaming answer) pays its whole
    estimate, so leaving early never buys free compute; an error status from vLLM pays no
    tokens (it refused before generating) but still counts as a request."""

    __slots__ = (
        "arrived", "events", "first_at", "sent", "status", "total", "waiting_bytes",
        "wants_usage",
    )  # fmt: skip

    def __init__(self, wants_usage: bool, arrived: float) -> None:
        self.wants_usage = wants_usage  # the client asked for the stream's usage chunk
        self.arrived = arrived  # loop time the guard had the whole request
        self.first_at: float | None = None  # loop time the first streamed bytes went out
        self.sent = False  # handed to vLLM (it may have worked on it)
        self.status = 0
        self.total: int | None = None  # usage.total_tokens, when vLLM reported it
        self.events = 0  # content events streamed
        self.waiting_bytes = 0  # body bytes counted against guard.max_waiting_body_bytes

    def used_tokens(self, est: Estimate, stream: bool) -> int:
        if self.total is not None:
            return self.total
        if self.status == 200 and stream:
            return est.prompt_tokens + self.events
        if self.status in (0, 200):
            return est.total
        return 0
