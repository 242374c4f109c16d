"""Responses the guard itself sends, in OpenAI's error format.

`{"error": {"message", "type", "param", "code"}}`, with a `retry-after` header where a
retry can succeed. Bodies that never change are built once at import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

Headers = list[tuple[bytes, bytes]]

_JSON = b"application/json"


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


class ErrorResponse:
    """A status and an OpenAI error body; `send` it with any extra headers."""

    __slots__ = ("body", "status")

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        self.status = status
        self.body = error_body(message, type_, code, param)

    async def send(self, send: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        await send_json(send, self.status, self.body, headers)


async def send_json(
    send: Any, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await send_body(send, status, body, _JSON, headers)


async def send_body(
    send: Any,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """A whole response in one body message."""
    start = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*start, *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def bad_request(message: str, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(400, message, "invalid_request_error", "invalid_request", param)


UNAUTHORIZED = ErrorResponse(
    401,
    "Missing or unknown API key. Send it as 'Authorization: Bearer KEY'.",
    "invalid_request_error",
    "invalid_api_key",
)
NOT_FOUND = ErrorResponse(
    404,
    "Not found. vllm-guard serves /v1/chat/completions, /v1/completions and /v1/models.",
    "invalid_request_error",
    "not_found",
)
METHOD_NOT_ALLOWED = ErrorResponse(
    405, "Method not allowed on this path.", "invalid_request_error", "method_not_allowed"
)
ENGINE_UNAVAILABLE = ErrorResponse(
    503,
    "The inference engine is starting, restarting or unreachable; retry after the delay in "
    "the retry-after header.",
    "service_unavailable",
    "engine_unavailable",
)
UPSTREAM_TIMEOUT = ErrorResponse(
    504, "The inference engine did not answer in time.", "server_error", "upstream_timeout"
)


def body_too_large(limit: int) -> ErrorResponse:
    return ErrorResponse(
        413,
        f"Request body is larger than this server's limit of {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
    )


def sse_error_event(message: str, code: str) -> bytes:
    """The event that ends a stream the guard must cut short (vLLM uses the same shape)."""
    return b"data: " + error_body(message, "server_error", code) + b"\n\n"
