"""The guard's HTTP/1.1 server connection: uvicorn's httptools protocol with the bounds a
public endpoint needs, which uvicorn does not set for httptools.

- request head (request line + headers): at most `max_header_bytes` bytes and
  `max_headers` headers, else 431; complete within `header_timeout_s` of the connection
  opening or the request's first byte, else 408;
- request body: complete within `body_timeout_s` of the head, else 408;
- open connections: at most `max_connections`; one more gets 503 with retry-after;
- a client that stops reading its response: once the guard has waited `send_stall_timeout_s`
  to write more, the connection is dropped. The app sees a disconnect and releases the
  request's slot, KV reservation and quota; vLLM is told to abort.

Malformed HTTP gets 400. Every refusal is an OpenAI-shaped JSON body on a
`connection: close` response. Where the app already runs (the body deadline), closing the
connection is what ends it: the app sees its client leave while it reads the body, before
anything was reserved.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vllm_guard.config import GuardSettings
from vllm_guard.proxy.responses import error_body

log = logging.getLogger("vllm_guard.http")


def _canned(status: bytes, message: str, type_: str, code: str, extra: bytes = b"") -> bytes:
    body = error_body(message, type_, code)
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n%s\r\n%s" % (status, len(body), extra, body)
    )


_LINGER_S = 2.0


class _Refuse(Exception):
    """Raised from a parser callback: answer these bytes and close the connection."""

    def __init__(self, response: bytes) -> None:
        super().__init__()
        self.response = response


def protocol_class(
    settings: GuardSettings, retry_after_s: int, on_drain: Callable[[], None] | None = None
) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's `http=`, with the bounds in `settings`; `on_drain`
    is called when the server starts draining (uvicorn shuts each connection down)."""
    head_too_large = _canned(
        b"431 Request Header Fields Too Large",
        f"Request head larger than {settings.max_header_bytes} bytes or with more than "
        f"{settings.max_headers} headers.",
        "invalid_request_error",
        "request_header_too_large",
    )
    head_timeout = _canned(
        b"408 Request Timeout",
        f"The request head did not arrive within {settings.header_timeout_s:g} s.",
        "invalid_request_error",
        "request_timeout",
    )
    body_timeout = _canned(
        b"408 Request Timeout",
        f"The request body did not arrive within {settings.body_timeout_s:g} s.",
        "invalid_request_error",
        "request_timeout",
    )
    malformed = _canned(
        b"400 Bad Request", "Invalid HTTP request.", "invalid_request_error", "invalid_http"
    )
    too_many = _canned(
        b"503 Service Unavailable",
        f"vllm-guard has {settings.max_connections} connections open, its limit; retry after "
        "the delay in the retry-after header.",
        "service_unavailable",
        "too_many_connections",
        b"retry-after: %d\r\n" % retry_after_s,
    )

    class GuardHttpProtocol(HttpToolsProtocol):
        # One timer per connection for the head and body deadlines: a request moves
        # `_deadline_at` (a float) instead of arming and cancelling a timer twice; the timer
        # re-arms itself when it fires before the current deadline.
        _timer: asyncio.TimerHandle | None = None
        _deadline_at: float | None = None
        _deadline_answer = b""
        _linger: asyncio.TimerHandle | None = None
        _stall: asyncio.TimerHandle | None = None
        _discarding = False  # answered and half-closed: what still arrives is dropped
        _in_head = True  # the bytes arriving belong to a request head
        _head_bytes = 0
        _head_tail = b""  # the last bytes of the head so far: its end may straddle reads
        _header_count = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                log.warning("refusing a connection: %d open", len(self.connections) - 1)
                self._answer_and_close(too_many)
                return
            self._arm(settings.header_timeout_s, head_timeout)

        def shutdown(self) -> None:
            if on_drain is not None:
                on_drain()  # first: queued requests are answered before their connections
            super().shutdown()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            for timer in (self._timer, self._linger, self._stall):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            # Head bytes are counted as they arrive, before the parser sees them: httptools
            # hands a header to its callback only once the whole value is in, so counting
            # there would let a client make the guard buffer (and re-copy) a huge value.
            if self._in_head:
                window = self._head_tail + data
                end = window.find(b"\r\n\r\n")
                self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._head_tail))
                if self._head_bytes > settings.max_header_bytes:
                    self._answer_and_close(head_too_large)
                    return
                self._head_tail = window[-3:]
            # uvicorn's, with JSON refusals: a callback's _Refuse, and malformed HTTP.
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                refused = exc.__context__
                if not isinstance(refused, _Refuse):
                    raise
                self._answer_and_close(refused.response)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError:
                self._answer_and_close(malformed)

        # -- the request head --------------------------------------------------------

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_count = 0
            self._arm(settings.header_timeout_s, head_timeout)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            if self._header_count > settings.max_headers:
                raise _Refuse(head_too_large)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes, self._head_tail = False, 0, b""
            self._arm(settings.body_timeout_s, body_timeout)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            self._in_head = True  # what comes next on the connection is the next head
            super().on_message_complete()

        # -- writing to a client that does not read ----------------------------------

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall is None:
                self._stall = self.loop.call_later(settings.send_stall_timeout_s, self._stalled)

        def resume_writing(self) -> None:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            super().resume_writing()

        def _stalled(self) -> None:
            self._stall = None
            log.warning(
                "dropping a client that read nothing for %g s", settings.send_stall_timeout_s
            )
            self.transport.abort()

        # -- internals ---------------------------------------------------------------

        def _arm(self, seconds: float, response: bytes) -> None:
            self._deadline_at = at = self.loop.time() + seconds
            self._deadline_answer = response
            if self._timer is None:
                self._timer = self.loop.call_at(at, self._check_deadline)

        def _disarm(self) -> None:
            self._deadline_at = None  # the timer, if armed, finds nothing to do

        def _check_deadline(self) -> None:
            self._timer = None
            at = self._deadline_at
            if at is None:
                return
            if self.loop.time() < at:
                self._timer = self.loop.call_at(at, self._check_deadline)
                return
            self._deadline_at = None
            self._expired(self._deadline_answer)

        def _expired(self, response: bytes) -> None:
            if self.cycle is not None and self.cycle.response_started:
                self.transport.close()  # cannot answer any more; just end it
            else:
                self._answer_and_close(response)

        def _answer_and_close(self, response: bytes) -> None:
            """Answer, then close our side and drop what the client still sends for a
            moment before closing (a lingering close): closing at once, while a client is
            still sending a huge head, would reset the connection and lose the answer."""
            self._disarm()
            transport = self.transport
            if transport.is_closing():
                return
            transport.write(response)
            if not transport.can_write_eof():
                transport.close()
                return
            transport.write_eof()
            self._discarding = True
            self._linger = self.loop.call_later(_LINGER_S, transport.close)

    return GuardHttpProtocol
