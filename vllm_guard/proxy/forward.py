"""Forward an admitted request to vLLM and its answer to the client, unchanged: headers from
an allowlist plus the guard's own, a stream passed on event by event (the usage chunk the
guard asked for taken out again), and what vLLM reported the request cost noted in its
`RequestUsage`. A response not read to its end drops its connection, which makes vLLM abort
the request and free its KV cache."""

from __future__ import annotations

import logging
from typing import Any

from vllm_guard.proxy import responses
from vllm_guard.proxy.clock import Clock
from vllm_guard.proxy.metrics import Outcome
from vllm_guard.proxy.usage import RequestUsage, UsageTap, usage_of_body, usage_total
from vllm_guard.upstream.connections import FORWARDED_RESPONSE_HEADERS, Upstream
from vllm_guard.upstream.h1client import EngineHungError, UpstreamConnectError

log = logging.getLogger("vllm_guard.proxy.forward")

UPSTREAM_ERRORS = (OSError, TimeoutError)
_EVENT_STREAM = b"text/event-stream"


class Forwarder:
    def __init__(self, clock: Clock, unavailable_headers: list[tuple[bytes, bytes]]) -> None:
        self.clock = clock
        self._unavailable_headers = unavailable_headers

    async def __call__(
        self,
        send: Any,
        upstream: Upstream,
        path: str,
        body: bytes,
        forwarded: list[tuple[bytes, bytes]],
        guard_headers: list[tuple[bytes, bytes]],
        stream: bool,
        usage: RequestUsage,
        failover: bool = False,
    ) -> Outcome:
        """Send the request to vLLM and its answer to the client; returns the outcome.
        Notes in `usage` what vLLM reported the request cost. `failover`: another engine
        could take it, so an engine that never answered — the connection could not be
        opened, or the engine hung before it sent anything — answers nothing here and
        returns `NOT_TAKEN`."""
        usage.sent = True
        try:
            resp = await upstream.post(path, body, forwarded)
        except UPSTREAM_ERRORS as exc:
            # Only a connection never made proves vLLM never saw the request.
            usage.sent = not isinstance(exc, UpstreamConnectError)
            if failover and isinstance(exc, (UpstreamConnectError, EngineHungError)):
                return Outcome.NOT_TAKEN
            return await self._upstream_failed(send, exc, guard_headers)

        headers = [(k, v) for k, v in resp.headers if k in FORWARDED_RESPONSE_HEADERS]
        headers += guard_headers
        usage.status = resp.status
        is_stream = stream and (resp.header(b"content-type") or b"").startswith(_EVENT_STREAM)
        try:
            if not is_stream:
                data = await resp.read()
                usage.total = usage_of_body(data)
                headers.append((b"content-length", b"%d" % len(data)))
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": headers}
                )
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return Outcome.OK
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            tap = UsageTap(keep_usage=usage.wants_usage)
            try:
                async for chunk in resp.chunks():
                    out = tap.feed(chunk)
                    if out:
                        if usage.first_at is None:
                            usage.first_at = self.clock.now()
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                rest = tap.flush()
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
            except UPSTREAM_ERRORS as exc:
                log.warning("upstream stream broke: %s", type(exc).__name__)
                event = responses.sse_error_event(
                    "The inference engine stopped in the middle of this response.",
                    "upstream_error",
                )
                await send({"type": "http.response.body", "body": event, "more_body": False})
                return Outcome.UPSTREAM_ERROR
            finally:
                usage.events = tap.events
                usage.total = usage_total(tap.usage)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return Outcome.OK
        except UPSTREAM_ERRORS as exc:
            return await self._upstream_failed(send, exc, guard_headers)
        finally:
            # A response not read to its end drops its connection: that is how vLLM learns
            # to abort the request and free its KV blocks, and no leftover of it can reach
            # the next request on a pooled connection.
            resp.release()

    async def _upstream_failed(
        self, send: Any, exc: BaseException, guard_headers: list[tuple[bytes, bytes]]
    ) -> Outcome:
        """Answer for a vLLM that failed before the response started: 504 when it went
        silent, else 503 with retry-after, since a vLLM that drops connections is usually
        restarting."""
        if isinstance(exc, TimeoutError):
            await responses.UPSTREAM_TIMEOUT.send(send, guard_headers)
        else:
            await responses.ENGINE_UNAVAILABLE.send(send, self._unavailable_headers + guard_headers)
        return Outcome.UPSTREAM_ERROR
