"""One generation request's own state as it goes through the stages of
`generation.Generation`, and the reading of it: the headers in one pass, the body up to its
limit, the watcher that notices its client leaving."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from vllm_guard.core.classes import PriorityClass, Tenant
from vllm_guard.core.cost import Estimate
from vllm_guard.core.quota import Reservation
from vllm_guard.proxy.body import ParsedRequest
from vllm_guard.proxy.classify import CLASS_HEADER
from vllm_guard.proxy.quota_gate import TenantGate
from vllm_guard.proxy.usage import RequestUsage
from vllm_guard.upstream.connections import FORWARDED_REQUEST_HEADERS

if TYPE_CHECKING:
    from vllm_guard.proxy.rules import Rules

CLASS_HEADER_OUT = b"x-vllm-guard-class"


class ClientWatch:
    """Per-request state shared with the disconnect watcher."""

    __slots__ = ("finished", "gone")

    def __init__(self) -> None:
        self.gone = False
        self.finished = False


class RequestHead:
    """What the guard reads from the request's headers, in one pass."""

    __slots__ = ("authorization", "class_header", "content_length", "forwarded")

    def __init__(self) -> None:
        self.authorization: bytes | None = None
        self.class_header: bytes | None = None
        self.content_length: bytes | None = None
        self.forwarded: list[tuple[bytes, bytes]] = []

    @classmethod
    def read(cls, headers: list[tuple[bytes, bytes]]) -> RequestHead | None:
        """None when it carries several Authorization headers (a 400)."""
        head = cls()
        for name, value in headers:
            if name == b"authorization":
                if head.authorization is not None:
                    return None
                head.authorization = value
            elif name == CLASS_HEADER:
                head.class_header = value
            elif name == b"content-length":
                head.content_length = value
            elif name in FORWARDED_REQUEST_HEADERS:
                head.forwarded.append((name, value))
        return head


class Request:
    """One generation request as it goes through the stages."""

    __slots__ = (
        "body", "est", "forwarded", "guard_headers", "parsed", "path", "priority_class",
        "quota", "reservation", "rules", "tenant", "usage",
    )  # fmt: skip

    def __init__(
        self,
        path: str,
        tenant: Tenant,
        priority_class: PriorityClass,
        forwarded: list[tuple[bytes, bytes]],
        arrived: float,
        rules: Rules,
    ) -> None:
        """`rules`: the config's rules as the request found them; it keeps them to its end."""
        self.rules = rules
        self.path = path
        self.tenant = tenant
        self.priority_class = priority_class
        self.forwarded = forwarded
        self.usage = RequestUsage(False, arrived)
        self.parsed: ParsedRequest = NO_BODY
        self.body = b""
        self.quota: TenantGate | None = None
        self.reservation: Reservation | None = None
        self.est = Estimate(0, 0, True)
        self.guard_headers = [(CLASS_HEADER_OUT, priority_class.header_value)]


NO_BODY = ParsedRequest({}, 1, False)


TOO_LARGE = object()


async def receive_body(receive: Any, limit: int) -> bytes | object | None:
    """The whole request body; `TOO_LARGE` past `limit`; None if the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return TOO_LARGE
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def watch_disconnect(receive: Any, conn: ClientWatch, task: asyncio.Task[Any]) -> None:
    """Cancel the request's task when its client disconnects before the response is done."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    if not conn.finished:
        conn.gone = True
        task.cancel()
