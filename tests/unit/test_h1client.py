"""The request path's HTTP/1.1 client against a raw socket server that answers with exactly
the bytes each test scripts, on the stdlib event loop and on uvloop (which the guard runs)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from vllm_guard.upstream.h1client import HIGH_WATER, Pool, UpstreamConnectError, UpstreamError

BODY = b'{"model": "tiny"}'
HEAD = (
    b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n" % len(BODY)
)
OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok": 42}\n'

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """Counts connections and requests; `answer(reader, writer)` replies to each request."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                await self.answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()

    def pool(self, read_timeout_s: float = 5.0, keepalive_s: float = 3.0) -> Pool:
        return Pool("127.0.0.1", self.port, 1.0, read_timeout_s, keepalive_s)


def reply(data: bytes) -> Handler:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return answer


def test_keep_alive_reuses_one_connection_and_sends_the_exact_request(run):
    async def main():
        async with Server(reply(OK)) as srv:
            pool = srv.pool()
            for _ in range(3):
                resp = await pool.post(HEAD, BODY)
                assert (resp.status, await resp.read()) == (200, b'{"ok": 42}\n')
                assert resp.header(b"content-type") == b"application/json"
                resp.release()
            assert srv.connections == 1
            assert srv.requests == [HEAD + BODY] * 3
            pool.close()

    run(main())


def test_chunked_body_arrives_piece_by_piece(run):
    async def main():
        gate = asyncio.Event()

        async def answer(reader, writer):
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n"
            )
            await writer.drain()
            await gate.wait()
            writer.write(b"2\r\nA\n\r\n0\r\n\r\n")
            await writer.drain()

        async with Server(answer) as srv:
            pool = srv.pool()
            resp = await pool.post(HEAD, BODY)
            chunks = resp.chunks()
            assert await anext(chunks) == b"data: "  # before the server sent the rest
            assert not resp.complete
            gate.set()
            assert [c async for c in chunks] == [b"A\n"]
            assert resp.complete
            resp.release()
            resp = await pool.post(HEAD, BODY)  # the same connection serves the next one
            gate.set()
            assert await resp.read() == b"data: A\n"
            resp.release()
            assert srv.connections == 1
            pool.close()

    run(main())


def test_silence_times_out_and_drops_the_connection(run):
    async def main():
        async def silent(reader, writer):
            assert await reader.read(1) == b""  # until the client hangs up

        async with Server(silent) as srv:
            pool = srv.pool(read_timeout_s=0.2)
            with pytest.raises(TimeoutError):
                await pool.post(HEAD, BODY)
            await asyncio.wait_for(srv.closed.wait(), 2)  # vLLM would abort the request

    run(main())


def test_silence_in_the_middle_of_a_body_times_out(run):
    async def main():
        async def stalls(reader, writer):
            writer.write(OK[:-4])
            await writer.drain()
            assert await reader.read(1) == b""  # until the client hangs up

        async with Server(stalls) as srv:
            resp = await srv.pool(read_timeout_s=0.2).post(HEAD, BODY)
            with pytest.raises(TimeoutError):
                await resp.read()
            await asyncio.wait_for(srv.closed.wait(), 2)

    run(main())


def test_cancelling_before_the_response_drops_the_connection(run):
    """A non-streaming request is cancelled (its client left) while vLLM still works on
    it: the connection must close, or vLLM computes the whole answer for nobody."""

    async def main():
        async def busy(reader, writer):
            assert await reader.read(1) == b""  # until the client hangs up

        async with Server(busy) as srv:
            pool = srv.pool()
            task = asyncio.create_task(pool.post(HEAD, BODY))
            await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.wait_for(srv.closed.wait(), 2)
            assert pool._idle == [] and pool._open == set()

    run(main())


def test_connection_closed_mid_body_is_an_error_and_not_reused(run):
    async def main():
        async def dies(reader, writer):
            writer.write(OK[:-4])
            await writer.drain()
            raise ConnectionError

        async with Server(dies) as srv:
            pool = srv.pool()
            resp = await pool.post(HEAD, BODY)
            with pytest.raises(UpstreamError):
                await resp.read()
            assert not resp.complete
            resp.close()
            with pytest.raises(UpstreamError):  # a fresh connection, which dies too
                await (await pool.post(HEAD, BODY)).read()
            assert srv.connections == 2

    run(main())


def test_refused_connection_says_the_request_was_never_sent(run):
    async def main():
        async with Server(reply(OK)) as srv:
            port = srv.port
        with pytest.raises(UpstreamConnectError):
            await Pool("127.0.0.1", port, 1.0, 5.0, 3.0).post(HEAD, BODY)

    run(main())


def test_connections_idle_too_long_or_marked_close_are_not_reused(run):
    async def main():
        closing = OK.replace(b"content-length", b"connection: close\r\ncontent-length")
        answers = iter([OK, closing, OK])

        async def answer(reader, writer):
            writer.write(next(answers))
            await writer.drain()

        async with Server(answer) as srv:
            pool = srv.pool(keepalive_s=0.1)
            for pause in (0.3, 0.0, 0.0):  # idle past keep-alive, then `connection: close`
                resp = await pool.post(HEAD, BODY)
                await resp.read()
                resp.release()
                await asyncio.sleep(pause)
            assert srv.connections == 3
            pool.close()

    run(main())


def test_malformed_response_is_an_error(run):
    async def main():
        async with Server(reply(b"SMTP ready\r\n\r\n")) as srv:
            with pytest.raises(UpstreamError):
                await srv.pool().post(HEAD, BODY)

    run(main())


def test_a_slow_reader_pauses_the_upstream(run):
    """A client that does not read must not make the guard buffer vLLM's whole answer."""
    size = 8 * HIGH_WATER

    async def main():
        async def big(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            writer.write(b"x" * size)
            await writer.drain()

        async with Server(big) as srv:
            resp = await srv.pool().post(HEAD, BODY)
            await asyncio.sleep(0.3)  # the server writes as fast as the guard reads
            buffered = resp._conn._buffered
            assert HIGH_WATER < buffered < 4 * HIGH_WATER
            assert len(await resp.read()) == size
            resp.release()

    run(main())


# Read to its end but for the rest: 64 KiB; or past the high-water mark in the very piece
# that completes it, so reading is paused too (reused, the next request would hang).
@pytest.mark.parametrize("size", [64 * 1024, 10 + HIGH_WATER + 100])
def test_a_response_not_read_to_its_end_never_goes_back_to_the_pool(run, size):
    """The engine finished (the parser saw the whole message) but the guard stopped reading
    part-way: its client left while the guard waited to hand on a chunk. Released like that,
    the connection must close: reused, the next request (any tenant's) would read the first
    response's leftover bytes, or hang on a connection paused past the high-water mark."""
    first = b"A" * size
    second = b'{"tenant": "B"}'
    answers = iter([first, second])

    async def answer(reader, writer):
        body = next(answers)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body[:10]))
        await writer.drain()
        await asyncio.sleep(0.05)  # the rest arrives as a later piece
        writer.write(body[10:])
        await writer.drain()

    async def main():
        async with Server(answer) as srv:
            pool = srv.pool(read_timeout_s=2.0)
            resp = await pool.post(HEAD, BODY)
            assert await anext(resp.chunks()) == b"A" * 10
            for _ in range(100):  # until the parser has the whole first message
                if resp.complete or resp._conn._paused:
                    break
                await asyncio.sleep(0.01)
            resp.release()  # the guard's `finally` after its client left
            resp = await pool.post(HEAD, BODY)
            assert await asyncio.wait_for(resp.read(), 3) == second
            resp.release()
            assert srv.connections == 2
            pool.close()

    run(main())
