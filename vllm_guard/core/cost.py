"""What a request will cost in tokens, before it runs: pure functions of its body.

Prompt tokens come from vLLM's own `POST /tokenize` (the chat form applies the
model's chat template and returns exactly the `usage.prompt_tokens` the request will get;
it runs in vLLM's API server and never touches the engine). When /tokenize cannot answer,
a heuristic of one token per 4 bytes of prompt text (plus 4 per chat message) stands in.
Completion tokens are the request's `max_completion_tokens` or `max_tokens`, or the
class's `default_max_tokens` when it sets neither, times the sequences it runs (prompts x
`n`; `proxy/body.py` has normalised those fields as vLLM reads them). What it cost after
the fact is read in `proxy/usage.py`.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

HEURISTIC_BYTES_PER_TOKEN = 4
HEURISTIC_TOKENS_PER_MESSAGE = 4


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


def estimate(
    path: str, payload: dict[str, Any], default_max_tokens: int, prompt_count_exact: int | None
) -> Estimate:
    """The request's cost: `prompt_count_exact` is vLLM's /tokenize count for the body
    `tokenize_request` gave (None when there was none, or vLLM could not say: the
    heuristic stands in)."""
    completion = completion_budget(path, payload, default_max_tokens)
    if prompt_count_exact is not None:
        return Estimate(prompt_count_exact, completion, True)
    return Estimate(heuristic_prompt_tokens(path, payload), completion, False)


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


def prompt_count(path: str, payload: dict[str, Any]) -> int:
    """Prompts vLLM runs for the request: a completion's `prompt` may be a list of strings
    or of token-id lists (a list of ints is one prompt). Malformed forms count 1; vLLM
    refuses them."""
    if path.endswith("/chat/completions"):
        return 1
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1
