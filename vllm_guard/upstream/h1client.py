"""A minimal HTTP/1.1 client for the request path: one POST to vLLM per request, keep-alive
connections, the response body handed on chunk by chunk as it arrives.

aiohttp's client was a third of the guard's CPU time per request (py-spy, benchmarks/
guard_capacity.py): header multidicts, URL objects, payload registries, tracing hooks and
cookie handling the guard never uses. Here a request is one `transport.write` of bytes
built in one expression, and httptools (the parser uvicorn uses) reads the response,
including chunked transfer coding.

Errors: `UpstreamConnectError` when no connection could be made (vLLM never saw the
request), `UpstreamError` when the connection broke or the response was malformed,
`TimeoutError` when vLLM stayed silent for `read_timeout_s`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools

# Pause reading from vLLM while this much of a response waits for the client to take it.
HIGH_WATER = 1 << 18


class BaseUrl(NamedTuple):
    host: str
    port: int
    netloc: str
    """host[:port] as written, for the Host header."""
    prefix: str
    """A path the request paths go under ("" for none)."""


def split_base_url(text: str) -> BaseUrl:
    """http://host[:port][/prefix] -> its parts; ValueError for anything else (https,
    a query, no host)."""
    url = urlsplit(text.rstrip("/"))
    if url.scheme != "http" or not url.hostname or url.query or url.fragment:
        raise ValueError(f"expected http://host:port[/prefix], got {text!r}")
    return BaseUrl(url.hostname, url.port or 80, url.netloc, url.path)


class UpstreamError(OSError):
    """The connection to vLLM broke, or vLLM's answer was not valid HTTP/1.1."""


class UpstreamConnectError(UpstreamError):
    """No connection to vLLM could be opened: the request was never sent."""


class EngineHungError(UpstreamError):
    """The guard gave up on a hung engine and ended its exchanges (`Pool.fail_all`)."""


class Response:
    """A response whose headers have arrived; its body follows through `read` or `chunks`.
    `release` (or `close`) must end it: the connection goes back to the pool only when the
    guard read the response to its end; anything else drops it, which also tells vLLM to
    abort a request it is still working on."""

    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: _Connection, status: int, headers: list[tuple[bytes, bytes]]):
        self._conn = conn
        self.status = status
        self.headers = headers
        """Names lower-cased, in arrival order."""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def complete(self) -> bool:
        """The engine sent the whole response (the guard may not have read all of it)."""
        return self._conn.complete

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer coding removed)."""
        conn = self._conn
        while True:
            chunk = await conn.next_chunk()
            if chunk is None:
                return
            yield chunk

    def release(self) -> None:
        """Done with the response: reuse the connection if it was read to the end and HTTP
        allows keep-alive, else close it."""
        self._conn.finish()

    def close(self) -> None:
        self._conn.abort()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parser callbacks feed a queue of body chunks."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # One parser for the connection's life: llhttp starts over after each message, and
        # a connection is reused only after its previous response was complete.
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._head: asyncio.Future[Response] | None = None
        self.complete = False
        self._keep_alive = False
        self.idle_since = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed response from the engine: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._pool.forget(self)
        if not self.complete:
            self._fail(UpstreamError("the engine closed the connection"), exc)

    # -- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        # Only valid here: after the message, llhttp has reset the state it reads.
        self._keep_alive = self._parser.should_keep_alive()
        head = self._head
        if head is not None and not head.done():
            head.set_result(Response(self, self._parser.get_status_code(), self._headers))

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- the request -------------------------------------------------------------------

    async def request(self, data: bytes, read_timeout_s: float) -> Response:
        assert self.transport is not None
        self._headers = []
        self.complete = self._keep_alive = False
        self._head = head = self._loop.create_future()
        self.transport.write(data)
        timer = self._loop.call_later(read_timeout_s, self._silent, head)
        try:
            return await head
        except BaseException:
            # Cancelled (the client left) or failed before the response began: dropping the
            # connection is how vLLM learns to abort the request.
            self.abort()
            raise
        finally:
            timer.cancel()
            self._head = None

    async def next_chunk(self) -> bytes | None:
        """The next piece of body; None once the response is complete."""
        while not self._chunks:
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            self._waiter = waiter = self._loop.create_future()
            timer = self._loop.call_later(self._pool.read_timeout_s, self._silent, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def read_to_end(self) -> bool:
        return self.complete and not self._chunks

    def finish(self) -> None:
        """Reuse the connection only if its response was read to the end: a response whose
        reader stopped early (its client left while the guard handed on a chunk) still has
        body queued, perhaps reading paused, and the next request on the connection, any
        tenant's, would read those bytes or hang."""
        if self.read_to_end and self._keep_alive and self.transport is not None:
            self.idle_since = self._loop.time()
            self._pool.put_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self._pool.forget(self)

    # -- internals ---------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _silent(self, fut: asyncio.Future[object]) -> None:
        if not fut.done():
            fut.set_exception(TimeoutError("the engine sent nothing for too long"))
        self.abort()

    def _fail(self, error: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None:
            error.__cause__ = cause
        self._error = error
        for fut in (self._head, self._waiter):
            if fut is not None and not fut.done():
                fut.set_exception(error)
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to one `host:port`, most recently used first."""

    def __init__(
        self,
        host: str,
        port: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float,
    ) -> None:
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    async def post(self, head: bytes, body: bytes) -> Response:
        """Send `head` (request line and headers, ending in a blank line) and `body`; return
        once the response's headers are in."""
        conn = self._idle_connection() or await self._connect()
        return await conn.request(head + body, self.read_timeout_s)

    def put_back(self, conn: _Connection) -> None:
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._open):
            conn.abort()

    def fail_all(self, error: UpstreamError) -> None:
        """End every exchange in progress with `error` (the engine is hung): their readers
        raise it, their connections close (vLLM aborts the requests if it ever wakes)."""
        for conn in list(self._open):
            conn._fail(error)
            conn.abort()

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection, dropping those idle too long: vLLM's
        server closes them after its own keep-alive timeout, and a request sent on a
        socket being closed would be lost."""
        idle = self._idle
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if conn.transport is not None and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.abort()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"cannot connect to the engine: {exc!r}") from exc
        self._open.add(conn)
        return conn
