"""The guard: a pure ASGI app in front of vLLM's OpenAI-compatible server.

Request path for the generation endpoints (see DESIGN.md):
auth -> class -> engine up? -> body (size, JSON, fields) -> admission (queue) ->
forward with the class's `priority` -> stream back unchanged -> release.

Every path out of `_generate` releases what the request holds: the slot is returned in a
`finally`, a queued request leaves its queue when its task is cancelled, and a client
that disconnects cancels the task, which closes the upstream connection so vLLM aborts
the request and frees its KV cache.

Other paths: `/health` and `/metrics` are the guard's own (no auth); `GET /v1/models`
passes through after auth; everything else, vLLM's admin and tokenizer paths included,
is 404 — the guard exposes only what it guards.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from vllm_guard import errors
from vllm_guard.admission import Admission
from vllm_guard.auth import Authenticator
from vllm_guard.classify import CLASS_HEADER, clamp_priority, resolve_class
from vllm_guard.config import CompiledConfig, PriorityClass
from vllm_guard.engine import EngineState
from vllm_guard.gate import Gate, RefusalReason, Refused, retry_after_header
from vllm_guard.metrics import GuardMetrics, render
from vllm_guard.upstream import FORWARDED_REQUEST_HEADERS, FORWARDED_RESPONSE_HEADERS, Upstream

log = logging.getLogger("vllm_guard.app")

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_QUEUE_HEADER = b"x-vllm-guard-queue-ms"
_CLASS_HEADER_OUT = b"x-vllm-guard-class"
_EVENT_STREAM = "text/event-stream"

Scope = dict[str, Any]


class _Connection:
    """Per-request state shared with the disconnect watcher."""

    __slots__ = ("finished", "gone")

    def __init__(self) -> None:
        self.gone = False
        self.finished = False


class GuardApp:
    def __init__(
        self,
        config: CompiledConfig,
        upstream: Upstream,
        engine: EngineState,
        admission: Admission | None = None,
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.engine = engine
        self.admission = admission or Admission(config.max_num_seqs, config.classes)
        self.gate = Gate(self.admission)
        self.auth = Authenticator(config.key_digests, config.anonymous)
        self.metrics = GuardMetrics(config, self.admission, engine)
        self._unavailable_headers = [
            (b"retry-after", str(config.guard.unavailable_retry_after_s).encode())
        ]
        self._too_large = errors.body_too_large(config.guard.max_body_bytes)

    # -- ASGI entry ---------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            method = scope["method"]
            if path in GENERATION_PATHS:
                if method != "POST":
                    return await errors.METHOD_NOT_ALLOWED.send(send)
                return await self._guarded(scope, receive, send, path)
            if path == "/v1/models" and method == "GET":
                return await self._models(scope, send)
            if path == "/health":
                return await self._health(send)
            if path == "/metrics":
                body, content_type = render(self.metrics.registry)
                return await errors.send_body(send, 200, body, content_type)
            return await errors.NOT_FOUND.send(send)
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        return None

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.upstream.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- simple paths -------------------------------------------------------------------

    async def _health(self, send: Any) -> None:
        body = json.dumps({"status": "ok" if self.engine.ready else self.engine.phase}).encode()
        if self.engine.ready:
            await errors.send_json(send, 200, body)
        else:
            await errors.send_json(send, 503, body, self._unavailable_headers)

    async def _models(self, scope: Scope, send: Any) -> None:
        headers = dict(scope["headers"])
        if self.auth.tenant_for(headers.get(b"authorization")) is None:
            return await errors.UNAUTHORIZED.send(send)
        if not self.engine.ready:
            return await errors.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)
        try:
            async with self.upstream.session.get(
                self.upstream.base_url + "/v1/models", headers=self.upstream.headers([], False)
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            return await errors.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)
        await errors.send_json(send, status, body)

    # -- generation ---------------------------------------------------------------------

    async def _guarded(self, scope: Scope, receive: Any, send: Any, path: str) -> None:
        authorization = class_header = content_length = None
        forwarded: list[tuple[bytes, bytes]] = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == CLASS_HEADER:
                class_header = value
            elif name == b"content-length":
                content_length = value
            elif name in FORWARDED_REQUEST_HEADERS:
                forwarded.append((name, value))

        tenant = self.auth.tenant_for(authorization)
        if tenant is None:
            return await errors.UNAUTHORIZED.send(send)
        priority_class = resolve_class(tenant, class_header, self.config.classes_by_name)
        if isinstance(priority_class, errors.ErrorResponse):
            return await priority_class.send(send)
        if not self.engine.ready:
            self.metrics.count(priority_class.name, "engine_unavailable")
            return await errors.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers)

        limit = self.config.guard.max_body_bytes
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            return await self._too_large.send(send)
        raw = await _read_body(receive, limit)
        if raw is None:
            return None  # client left while sending its body
        if raw is _TOO_LARGE:
            return await self._too_large.send(send)
        assert isinstance(raw, bytes)
        payload = _parse_payload(raw)
        if isinstance(payload, errors.ErrorResponse):
            return await payload.send(send)
        priority = clamp_priority(payload.get("priority"), priority_class)
        if isinstance(priority, errors.ErrorResponse):
            return await priority.send(send)
        payload["priority"] = priority
        # ASCII output: a lone surrogate a client sent ("\ud800") stays escaped, never a 500.
        body = json.dumps(payload, separators=(",", ":")).encode()

        # From here the request may wait and hold a slot: watch for the client leaving.
        conn = _Connection()
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(_watch_disconnect(receive, conn, task))
        try:
            await self._admit_and_forward(
                send, path, body, forwarded, priority_class, payload.get("stream") is True
            )
        except asyncio.CancelledError:
            if not conn.gone:
                raise
            task.uncancel()
            self.metrics.count(priority_class.name, "client_disconnect")
        finally:
            conn.finished = True
            watcher.cancel()
        return None

    async def _admit_and_forward(
        self,
        send: Any,
        path: str,
        body: bytes,
        forwarded: list[tuple[bytes, bytes]],
        priority_class: PriorityClass,
        stream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            ticket = await self.gate.acquire(priority_class)
        except Refused as refused:
            return await self._refuse(send, refused)
        try:
            waited_s = loop.time() - started
            self.metrics.queue_wait[priority_class.name].observe(waited_s)
            guard_headers = [
                (_CLASS_HEADER_OUT, priority_class.header_value),
                (_QUEUE_HEADER, f"{waited_s * 1000:.1f}".encode()),
            ]
            outcome = await self._forward(send, path, body, forwarded, guard_headers, stream)
            self.metrics.count(priority_class.name, outcome)
        finally:
            self.gate.release(ticket)
        return None

    async def _refuse(self, send: Any, refused: Refused) -> None:
        name = refused.priority_class.name
        if refused.reason is RefusalReason.QUEUE_FULL:
            self.metrics.count(name, "queue_full")
            message = (
                f"The {name!r} queue is full ({refused.priority_class.max_queue} requests "
                "waiting); retry after the delay in the retry-after header."
            )
        else:
            self.metrics.count(name, "queue_timeout")
            message = (
                f"No engine slot became free for class {name!r} within its max_wait_s of "
                f"{refused.priority_class.max_wait_s:g} s; retry after the delay in the "
                "retry-after header."
            )
        response = errors.ErrorResponse(503, message, "service_unavailable", refused.reason.value)
        retry_ms = int(refused.retry_after_s * 1000)
        await response.send(
            send,
            [
                (b"retry-after", retry_after_header(refused.retry_after_s)),
                (b"retry-after-ms", str(retry_ms).encode()),
                (_CLASS_HEADER_OUT, refused.priority_class.header_value),
            ],
        )

    async def _forward(
        self,
        send: Any,
        path: str,
        body: bytes,
        forwarded: list[tuple[bytes, bytes]],
        guard_headers: list[tuple[bytes, bytes]],
        stream: bool,
    ) -> str:
        """Send the request to vLLM and its answer to the client; returns the outcome."""
        upstream = self.upstream
        try:
            resp = await upstream.session.post(
                upstream.base_url + path, data=body, headers=upstream.headers(forwarded, True)
            )
        except _UPSTREAM_ERRORS as exc:
            return await self._upstream_failed(send, exc, guard_headers)

        headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in resp.headers.items()
            if name.lower() in FORWARDED_RESPONSE_HEADERS
        ]
        headers += guard_headers
        is_stream = stream and resp.headers.get("content-type", "").startswith(_EVENT_STREAM)
        try:
            if not is_stream:
                data = await resp.read()
                headers.append((b"content-length", str(len(data)).encode()))
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": headers}
                )
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return "ok"
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            try:
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except _UPSTREAM_ERRORS as exc:
                log.warning("upstream stream broke: %s", type(exc).__name__)
                event = errors.sse_error_event(
                    "The inference engine stopped in the middle of this response.",
                    "upstream_error",
                )
                await send({"type": "http.response.body", "body": event, "more_body": False})
                return "upstream_error"
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return "ok"
        except _UPSTREAM_ERRORS as exc:
            return await self._upstream_failed(send, exc, guard_headers)
        finally:
            # Closing (not releasing) an unfinished response drops the connection, which is
            # how vLLM learns to abort the request and free its KV blocks.
            if not resp.content.at_eof():
                resp.close()
            else:
                resp.release()

    async def _upstream_failed(
        self, send: Any, exc: BaseException, guard_headers: list[tuple[bytes, bytes]]
    ) -> str:
        """Answer for a vLLM that failed before the response started: 504 when it went
        silent (aiohttp's timeouts are also ClientErrors, so this is checked first), else
        503 with retry-after, since a vLLM that drops connections is usually restarting."""
        if isinstance(exc, TimeoutError):
            await errors.UPSTREAM_TIMEOUT.send(send, guard_headers)
        else:
            await errors.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers + guard_headers)
        return "upstream_error"


# ---------------------------------------------------------------------------------------

_UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)

_TOO_LARGE = object()


async def _read_body(receive: Any, limit: int) -> bytes | object | None:
    """The whole request body; `_TOO_LARGE` past `limit`; None if the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _TOO_LARGE
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _parse_payload(raw: bytes) -> dict[str, Any] | errors.ErrorResponse:
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return errors.bad_request(f"Request body is not valid JSON: {exc}.")
    if not isinstance(payload, dict):
        return errors.bad_request("Request body must be a JSON object.")
    stream = payload.get("stream")
    if stream is not None and type(stream) is not bool:
        return errors.bad_request("'stream' must be a boolean.", param="stream")
    return payload


async def _watch_disconnect(receive: Any, conn: _Connection, task: asyncio.Task[Any]) -> None:
    """Cancel the request's task when its client disconnects before the response is done."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    if not conn.finished:
        conn.gone = True
        task.cancel()
