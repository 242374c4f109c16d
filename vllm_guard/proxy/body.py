"""The request body as vLLM will read it: parsed once, checked, and normalised.

vLLM's request models are pydantic models in lax mode, so `"max_tokens": "1500"`,
`1500.0` and `"n": "16"` run as the integers 1500 and 16. The guard reads the fields it
counts (`max_tokens`, `max_completion_tokens`, `n`) with the same pydantic coercion and
forwards the integers it read, so what it charges, reserves and admits is what vLLM runs.
A request runs `prompts x n` sequences (`prompt` may be a list of prompts on
/v1/completions); each holds an engine slot. Forms the guard cannot count are refused with
a 400 that says why: beam search (vLLM expands it into many engine requests of its own),
`best_of` above 1, and `prompt_embeds` (a prompt the guard cannot measure).

Refused as bad input, each with an OpenAI-shaped 400 and nothing reserved: bodies that are
not JSON objects, nested past the parser's recursion limit, or that hold NaN or Infinity
(not JSON, though Python's parser accepts them); and counted integers that are negative
or beyond what any engine runs.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from vllm_guard.core.cost import prompt_count
from vllm_guard.proxy import responses

# Lax, as vLLM's request models read them (the same pydantic coercion).
_INT = TypeAdapter(int | None)
_BOOL = TypeAdapter(bool | None)
MAX_COUNTED_INT = 2**31 - 1
"""Largest max_tokens / n the guard accepts; far beyond any model's context length."""

_COUNTED_INTS = ("max_tokens", "max_completion_tokens", "n", "best_of")


class ParsedRequest:
    """A generation request's JSON body, normalised. `sequences` = prompts x n."""

    __slots__ = ("payload", "prompts", "stream")

    def __init__(self, payload: dict[str, Any], prompts: int, stream: bool) -> None:
        self.payload = payload
        self.prompts = prompts
        self.stream = stream

    @property
    def n(self) -> int:
        n = self.payload.get("n")
        return n if isinstance(n, int) and n >= 1 else 1

    @property
    def sequences(self) -> int:
        return self.prompts * self.n


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# Built once: json.loads with any keyword argument builds a new decoder for every call.
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def _text(raw: bytes) -> str:
    """The body as text, as json.loads reads bytes (UTF-8, -16 or -32); a BOM is an
    error, as json.loads says for text that starts with one."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return text


def parse_request(raw: bytes, path: str) -> ParsedRequest | responses.ErrorResponse:
    """Parse and normalise a /v1/completions or /v1/chat/completions body."""
    try:
        payload = _DECODER.decode(_text(raw))
    except RecursionError:
        return responses.bad_request("Request body is nested too deeply.")
    except (ValueError, UnicodeDecodeError) as exc:
        return responses.bad_request(f"Request body is not valid JSON: {exc}.")
    if not isinstance(payload, dict):
        return responses.bad_request("Request body must be a JSON object.")
    stream = payload.get("stream")
    if stream is not None and type(stream) is not bool:
        return responses.bad_request("'stream' must be a boolean.", param="stream")
    for key in _COUNTED_INTS:
        if key not in payload:
            continue
        value = _lax(_INT, payload[key])
        if value is _INVALID or (value is not None and not 0 <= value <= MAX_COUNTED_INT):
            return responses.bad_request(
                f"'{key}' must be an integer from 0 to {MAX_COUNTED_INT}.", param=key
            )
        payload[key] = value
    if "n" in payload and payload["n"] == 0:
        return responses.bad_request("'n' must be at least 1.", param="n")
    if (payload.get("best_of") or 1) > 1:
        return _uncountable("best_of", "'best_of' above 1 is not supported; use n")
    beam = _lax(_BOOL, payload.get("use_beam_search"))
    if beam is _INVALID:
        return responses.bad_request("'use_beam_search' must be a boolean.", "use_beam_search")
    if beam:
        return _uncountable("use_beam_search", "beam search is not supported through the guard")
    if payload.get("prompt_embeds") is not None:
        return _uncountable("prompt_embeds", "prompt_embeds cannot be measured by the guard")
    return ParsedRequest(payload, prompt_count(path, payload), stream is True)


_INVALID = object()


def _lax(adapter: TypeAdapter[Any], value: Any) -> Any:
    try:
        return adapter.validate_python(value)
    except (ValidationError, TypeError):
        return _INVALID


def _uncountable(param: str, why: str) -> responses.ErrorResponse:
    return responses.ErrorResponse(
        400,
        f"{why}: vllm-guard admits, reserves and charges each request by the sequences it "
        "runs, and cannot count this one.",
        "invalid_request_error",
        "unsupported_parameter",
        param,
    )


def dump(payload: dict[str, Any]) -> bytes | None:
    """The body to forward; None when it nests too deeply to serialise. ASCII output: a
    lone surrogate a client sent ("\\ud800") stays escaped, never a 500."""
    try:
        return json.dumps(payload, separators=(",", ":")).encode()
    except RecursionError:
        return None
