"""Only the guard may talk to the engine: an ASGI middleware for vLLM's API server.

`serve` starts vLLM with `--middleware vllm_guard.engine.middleware.RequireGuardKey` and a
random key in its environment (`VLLM_GUARD_ENGINE_KEY`: in the environment, never in argv,
which `ps` shows to every local user). Every HTTP request and WebSocket to vLLM's port —
`/v1/*`, `/invocations`, `/tokenize`, `/health`, `/metrics`, whatever vLLM mounts — must
carry the key in `x-vllm-guard-engine-key`, compared in constant time, or gets 401. vLLM's
own `--api-key` checks only `/v1`, `/v2`, `/inference` and `/cohere`, so it is not enough.
Runs in vLLM's API server process; imports only the standard library.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

KEY_ENV = "VLLM_GUARD_ENGINE_KEY"
HEADER = "x-vllm-guard-engine-key"
_HEADER = HEADER.encode()
_REFUSAL = json.dumps(
    {
        "error": {
            "message": "This vLLM serves vllm-guard only; send requests to the guard.",
            "type": "authentication_error",
            "param": None,
            "code": "engine_key_required",
        }
    }
).encode()


class RequireGuardKey:
    def __init__(self, app: Any) -> None:
        key = os.environ.get(KEY_ENV)
        if not key:
            raise RuntimeError(f"{KEY_ENV} is not set: the engine would answer anyone")
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket") and not self._allowed(scope):
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 4401})
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_REFUSAL)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _REFUSAL})
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: dict[str, Any]) -> bool:
        presented = b""
        for name, value in scope.get("headers") or ():
            if name.lower() == _HEADER:
                presented = value
                break
        return hmac.compare_digest(hashlib.sha256(presented).digest(), self._digest)
