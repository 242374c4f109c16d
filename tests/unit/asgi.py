"""Drive an ASGI app directly: no server, no sockets on the client side."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One request: `receive` yields the body, then blocks until `disconnect()`."""

    def __init__(self, body: bytes, chunk_size: int | None = None) -> None:
        self._parts = (
            [body]
            if chunk_size is None
            else [body[i : i + chunk_size] for i in range(0, max(len(body), 1), chunk_size)]
        )
        self._gone = asyncio.Event()
        self.reply = Reply()
        self.first_body = asyncio.Event()

    def disconnect(self) -> None:
        self._gone.set()

    async def receive(self) -> dict[str, Any]:
        if self._parts:
            part = self._parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(self._parts)}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.reply.status = message["status"]
            self.reply.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            self.reply.chunks.append(message.get("body", b""))
            if message.get("body"):
                self.first_body.set()
            if not message.get("more_body", False):
                self.reply.complete = True
                self._gone.set()  # like uvicorn: receive() returns disconnect afterwards


def scope(method: str, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }


async def call(
    app: Any,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = b"",
    client: Client | None = None,
) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    client = client or Client(raw)
    await app(scope(method, path, headers), client.receive, client.send)
    return client.reply
