"""The connection pool to vLLM's OpenAI-compatible server."""

from __future__ import annotations

import aiohttp

from vllm_guard.config import GuardSettings

# Request headers a client may pass on to vLLM. Everything else is dropped: hop-by-hop
# headers, the client's credentials, and headers vLLM acts on that a client must not
# control (X-Vllm-Priority overrides the body's priority; X-data-parallel-rank routes).
FORWARDED_REQUEST_HEADERS = frozenset(
    {b"accept", b"user-agent", b"x-request-id", b"x-session-id", b"traceparent", b"tracestate"}
)
# Response headers passed back to the client (the guard adds its own).
FORWARDED_RESPONSE_HEADERS = frozenset({"content-type", "x-request-id"})
UPSTREAM_KEEPALIVE_S = 3.0


class Upstream:
    """One aiohttp session for the guard's lifetime; `base_url` like http://127.0.0.1:8001."""

    def __init__(self, base_url: str, settings: GuardSettings, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self._settings = settings
        self._auth = (b"authorization", b"Bearer " + api_key.encode()) if api_key else None
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Idle connections are dropped before vLLM's own keep-alive timeout (uvicorn's
            # 5 s there), so the guard never sends a request on a socket vLLM is closing.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
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
        if self._auth is not None:
            out["Authorization"] = self._auth[1].decode("latin-1")
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
