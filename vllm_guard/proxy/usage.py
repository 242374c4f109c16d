"""What a request cost, after the fact: vLLM's `usage`.

A stream asks vLLM for usage (`stream_options.include_usage`) even when the client did not;
`UsageTap` reads it from the final chunk and removes that chunk when the client had not
asked for it. A stream cut off before its usage chunk is settled as prompt tokens + one
token per content event streamed (vLLM sends one event per decoded step, so this is exact
without speculative decoding and an upper bound with it).
"""

from __future__ import annotations

import json
import re
from typing import Any

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def usage_total(usage: Any) -> int | None:
    if isinstance(usage, dict):
        total = usage.get("total_tokens")
        if type(total) is int:
            return total
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
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return False
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
