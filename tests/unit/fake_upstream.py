"""A stand-in for vLLM's HTTP surface, for protocol-level unit tests only.

It records what the guard forwarded and can stream slowly, hang, or die mid-stream.
Evidence that features work end to end comes from the integration tests on a real vLLM.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from aiohttp import web


class FakeVllm:
    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.mode = "ok"  # ok | hang | die_mid_stream | slow | big | surrogate
        self.big_body_bytes = 0  # mode "big": a stream this long, written at once
        self.release = asyncio.Event()
        self.active = 0
        self.aborted = 0
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.tokenize_calls = 0
        self.tokenize_peak = 0  # most /tokenize calls at once
        self.tokenize_delay_s = 0.0
        self._tokenizing = 0
        self.completion_tokens = 5  # tokens each fake answer "generates"
        # /metrics: a real vLLM 0.32 scrape; set metrics_status to 500 to make it fail.
        self.metrics_text = (Path(__file__).parent / "data" / "vllm_metrics.txt").read_text()
        self.metrics_status = 200

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def prompt_tokens(body: dict[str, Any]) -> int:
        """The fake's tokenizer: one token per character of prompt or message content
        (of the JSON text, for shapes a real engine would refuse)."""
        try:
            if "messages" in body:
                return sum(len(m.get("content", "")) for m in body["messages"])
            return len(body.get("prompt", ""))
        except (TypeError, AttributeError):
            return len(json.dumps(body.get("messages", body.get("prompt"))))

    async def _tokenize(self, request: web.Request) -> web.Response:
        self.tokenize_calls += 1
        self._tokenizing += 1
        self.tokenize_peak = max(self.tokenize_peak, self._tokenizing)
        try:
            await asyncio.sleep(self.tokenize_delay_s)
            return web.json_response({"count": self.prompt_tokens(await request.json())})
        finally:
            self._tokenizing -= 1

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "tiny", "max_model_len": 4096}]}
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _metrics(self, request: web.Request) -> web.Response:
        # The requests it holds are the ones it reports running, as vLLM would.
        text = re.sub(
            r"^(vllm:num_requests_running\{[^}]*\}) \S+$",
            rf"\g<1> {float(self.active)}",
            self.metrics_text,
            flags=re.M,
        )
        return web.Response(text=text, status=self.metrics_status)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((dict(request.headers), body))
        self.active += 1
        try:
            while self.mode == "hang" and not self.release.is_set():
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError  # the guard hung up: vLLM aborts
                await asyncio.sleep(0.01)
            prompt = self.prompt_tokens(body)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens,
            }
            if not body.get("stream"):
                # "surrogate": a lone UTF-16 surrogate in the text, as JSON allows (\ud800)
                text = "hi \ud800" if self.mode == "surrogate" else "hi"
                return web.json_response({"choices": [{"text": text}], "usage": usage})
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            if self.mode == "big":
                event = b'data: {"tenant": "%s"}\n\n' % request.headers["x-request-id"].encode()
                piece = event * (16384 // len(event))  # one chunk of the transfer coding each
                size = body.get("big_body_bytes", self.big_body_bytes)  # a test may choose
                for _ in range(size // len(piece)):
                    await resp.write(piece)
                await resp.write(b"data: [DONE]\n\n")
                return resp
            for i in range(self.completion_tokens if self.mode == "ok" else 5):
                await resp.write(b"data: " + json.dumps({"i": i}).encode() + b"\n\n")
                if self.mode == "die_mid_stream" and i == 1:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if self.mode == "slow":
                    await asyncio.sleep(0.05)
            if (body.get("stream_options") or {}).get("include_usage"):
                chunk = {"choices": [], "usage": usage}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted += 1
            raise
        finally:
            self.active -= 1


async def _serve_forever(port: int, mode: str, big_body_bytes: int) -> None:
    fake = FakeVllm()
    fake.mode, fake.big_body_bytes = mode, big_body_bytes
    await fake.start(port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":  # a stand-in engine in its own process, for `vllm-guard proxy`
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", default="ok")
    parser.add_argument("--big-body-bytes", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_serve_forever(args.port, args.mode, args.big_body_bytes))
