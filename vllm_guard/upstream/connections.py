"""The connections to vLLM's OpenAI-compatible server: the request path's own lean pool
(`h1client`) for generation requests, an aiohttp session for everything else (model list,
/tokenize)."""

from __future__ import annotations

from typing import Any

import aiohttp

from vllm_guard.config import GuardSettings
from vllm_guard.engine.middleware import HEADER as ENGINE_KEY_HEADER
from vllm_guard.upstream.answers import count, dig, parse_json
from vllm_guard.upstream.h1client import EngineHungError, Pool, Response, split_base_url

# Request headers a client may pass on to vLLM. Everything else is dropped: hop-by-hop
# headers, the client's credentials, and headers vLLM acts on that a client must not
# control (X-Vllm-Priority overrides the body's priority; X-data-parallel-rank routes).
FORWARDED_REQUEST_HEADERS = frozenset(
    {b"accept", b"user-agent", b"x-request-id", b"x-session-id", b"traceparent", b"tracestate"}
)
# Response headers passed back to the client (the guard adds its own).
FORWARDED_RESPONSE_HEADERS = frozenset({b"content-type", b"x-request-id"})
UPSTREAM_KEEPALIVE_S = 3.0
_TOKENIZE_TIMEOUT = aiohttp.ClientTimeout(total=5)


class Upstream:
    """Connections for the guard's lifetime; `base_url` like http://127.0.0.1:8001."""

    def __init__(
        self,
        base_url: str,
        settings: GuardSettings,
        api_key: str | None = None,
        engine_key: str | None = None,
    ):
        """`api_key`: vLLM's own --api-key, if it runs with one; `engine_key`: the key
        `engine/middleware.py` requires on every request to the engine."""
        self.base_url = base_url.rstrip("/")
        self._url = split_base_url(base_url)
        self.label = self._url.netloc
        """host:port, as metrics and logs name the engine."""
        self._host_header = self._url.netloc.encode()
        self._prefix = self._url.prefix.encode()
        self._settings = settings
        self._extra: list[tuple[bytes, bytes]] = []  # sent on every request to vLLM
        if api_key:
            self._extra.append((b"authorization", b"Bearer " + api_key.encode()))
        if engine_key:
            self._extra.append((ENGINE_KEY_HEADER.encode(), engine_key.encode()))
        self._session: aiohttp.ClientSession | None = None
        self._pool: Pool | None = None
        self._tokenize_free = settings.max_concurrent_tokenize

    async def post(self, path: str, body: bytes, forwarded: list[tuple[bytes, bytes]]) -> Response:
        """POST a JSON `body` to `path` (one of the guard's fixed paths) with the client's
        `forwarded` headers; returns once the response headers are in."""
        if self._pool is None:
            s = self._settings
            self._pool = Pool(
                self._url.host,
                self._url.port,
                s.upstream_connect_timeout_s,
                s.upstream_read_timeout_s,
                UPSTREAM_KEEPALIVE_S,
            )
        head = [
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n" % (self._prefix + path.encode(), self._host_header, len(body))
        ]
        for name, value in [*forwarded, *self._extra] if self._extra else forwarded:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        return await self._pool.post(b"".join(head), body)

    async def tokenize(self, body: dict[str, Any]) -> int | None:
        """vLLM's `POST /tokenize` count for `body`; None when vLLM cannot answer, or at once
        when `max_concurrent_tokenize` calls are already out (callers then use a bound or
        a heuristic: a flood of requests never becomes a flood of engine calls)."""
        if self._tokenize_free <= 0:
            return None
        self._tokenize_free -= 1
        try:
            async with self.session.post(
                self.base_url + "/tokenize",
                json=body,
                headers=self.headers([], True),
                timeout=_TOKENIZE_TIMEOUT,
            ) as resp:
                if resp.status == 200:
                    return count(dig(parse_json(await resp.read()), "count"))
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        finally:
            self._tokenize_free += 1
        return None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Idle connections are dropped before vLLM's own keep-alive timeout (uvicorn's
            # 5 s there), so the guard never sends a request on a socket vLLM is closing.
            # /tokenize calls are bounded above; a few more for /v1/models.
            connector = aiohttp.TCPConnector(
                limit=self._settings.max_concurrent_tokenize + 4,
                keepalive_timeout=UPSTREAM_KEEPALIVE_S,
            )
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=self._settings.upstream_connect_timeout_s,
                sock_read=self._settings.upstream_read_timeout_s,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    def headers(self, forwarded: list[tuple[bytes, bytes]], has_body: bool) -> dict[str, str]:
        out = {name.decode("latin-1"): value.decode("latin-1") for name, value in forwarded}
        if has_body:
            out["Content-Type"] = "application/json"
        for name, value in self._extra:
            out[name.decode("latin-1")] = value.decode("latin-1")
        return out

    def fail_in_flight(self, reason: str) -> None:
        """End every generation request in progress with an error (the engine is hung)."""
        if self._pool is not None:
            self._pool.fail_all(EngineHungError(f"the engine is hung: {reason}"))

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None
