"""What a request will cost in tokens, before it runs; and what it cost, after.

Before: prompt tokens come from vLLM's own `POST /tokenize` (the chat form applies the
model's chat template and returns exactly the `usage.prompt_tokens` the request will get;
it runs in vLLM's API server and never touches the engine). When /tokenize cannot answer,
a heuristic of one token per 4 bytes of prompt text (plus 4 per chat message) stands in.
Completion tokens are the request's `max_completion_tokens` or `max_tokens`, or the
class's `default_max_tokens` when it sets neither, times the sequences it runs (prompts x
`n`; `body.py` has normalised those fields as vLLM reads them).

After: the response's `usage`. A stream asks vLLM for usage (`stream_options.include_usage`)
even when the client did not; `UsageTap` reads it from the final chunk and removes that
chunk when the client had not asked for it. A stream cut off before its usage chunk is
settled as prompt tokens + one token per content event streamed (vLLM sends one event per
decoded step, so this is exact without speculative decoding and an upper bound with it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from vllm_guard.body import prompt_count

HEURISTIC_BYTES_PER_TOKEN = 4
HEURISTIC_TOKENS_PER_MESSAGE = 4
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


class Estimate(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    exact_prompt: bool

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def completion_budget(path: str, payload: dict[str, Any], default_max_tokens: int) -> int:
    budget = default_max_tokens
    for key in ("max_tokens", "max_completion_tokens"):  # the latter wins, as in vLLM
        value = payload.get(key)
        if type(value) is int and value >= 0:
            budget = value
    n = payload.get("n")
    copies = n if type(n) is int and n >= 1 else 1
    return budget * copies * prompt_count(path, payload)


def heuristic_prompt_tokens(path: str, payload: dict[str, Any]) -> int:
    if path.endswith("/chat/completions"):
        messages = payload.get("messages")
        n_messages = len(messages) if isinstance(messages, list) else 1
        text = json.dumps(messages, ensure_ascii=False)
        return math.ceil(_utf8_len(text) / HEURISTIC_BYTES_PER_TOKEN) + (
            HEURISTIC_TOKENS_PER_MESSAGE * n_messages
        )
    ids = _token_ids(payload.get("prompt"))
    if ids is not None:
        return ids  # already token ids
    prompt = payload.get("prompt")
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return math.ceil(_utf8_len(text) / HEURISTIC_BYTES_PER_TOKEN)


BOUND_TOKENS_PER_MESSAGE = 16
BOUND_TOKENS_PER_PROMPT = 16


def prompt_token_bound(path: str, payload: dict[str, Any], body_bytes: int) -> int:
    """An upper bound on the prompt's tokens without a tokenizer: a token of a byte-level
    or SentencePiece tokenizer covers at least one byte of text, and the request's JSON
    body (`body_bytes` long) holds every byte of the prompt text — escaped, never shorter —
    so its length plus a margin per message for the template's special tokens bounds the
    count. Costs nothing: the body is already serialized."""
    if path.endswith("/chat/completions"):
        messages = payload.get("messages")
        n_messages = len(messages) if isinstance(messages, list) else 1
        return body_bytes + BOUND_TOKENS_PER_MESSAGE * n_messages + BOUND_TOKENS_PER_PROMPT
    ids = _token_ids(payload.get("prompt"))
    if ids is not None:
        return ids
    return body_bytes + BOUND_TOKENS_PER_PROMPT * prompt_count(path, payload)


def _token_ids(prompt: Any) -> int | None:
    """How many token ids a prompt given as ids holds (one list, or a list of lists);
    None for text."""
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return len(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and all(type(t) is int for t in p) for p in prompt)
    ):
        return sum(len(p) for p in prompt)
    return None


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))  # a lone surrogate is still a byte run


def tokenize_request(path: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The /tokenize body giving this request's prompt tokens, or None when no single
    call can (a completion with a list of prompts)."""
    model = payload.get("model")
    if path.endswith("/chat/completions"):
        body: dict[str, Any] = {"model": model, "messages": payload.get("messages")}
        for key in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs"):
            if key in payload:
                body[key] = payload[key]
        if "tools" in payload:
            body["tools"] = payload["tools"]
        return body
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return {"model": model, "prompt": prompt}
    return None


async def estimate(
    tokenize: Callable[[dict[str, Any]], Awaitable[int | None]],
    path: str,
    payload: dict[str, Any],
    default_max_tokens: int,
) -> Estimate:
    """`tokenize(body)`: vLLM's /tokenize count for a body, None when it cannot say."""
    completion = completion_budget(path, payload, default_max_tokens)
    body = tokenize_request(path, payload)
    if body is not None:
        count = await tokenize(body)
        if count is not None:
            return Estimate(count, completion, True)
    return Estimate(heuristic_prompt_tokens(path, payload), completion, False)


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
