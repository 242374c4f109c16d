"""Run the guard: uvicorn on the public port, plus the engine's supervisor or poller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from vllm_guard.config import CompiledConfig
from vllm_guard.engine.launcher import VllmSupervisor
from vllm_guard.engine.state import EngineState, detect_scheduling_policy, poll_health
from vllm_guard.engine.watchdog import EngineWatchdog
from vllm_guard.proxy.app import GuardApp
from vllm_guard.proxy.http_server import protocol_class
from vllm_guard.proxy.reload import ReloadStatus, reload_now
from vllm_guard.upstream.connections import Upstream

log = logging.getLogger("vllm_guard.proxy.server")


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run `main` on uvloop where it is installed."""
    factory: Callable[[], asyncio.AbstractEventLoop]
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@dataclass(frozen=True)
class Listen:
    """Where the guard listens: the public address, and a separate one for /metrics and
    /metrics/engine when `metrics_port` is set (then the public port answers 404 there)."""

    host: str
    port: int
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None

    def sockets(self) -> list[socket.socket] | None:
        """The listening sockets when there are two; None: uvicorn binds host:port."""
        if self.metrics_port is None:
            return None
        return [_bind(self.host, self.port), _bind(self.metrics_host, self.metrics_port)]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    # Not inheritable (Python's default): a vLLM child started later must not hold the
    # guard's listening sockets open after the guard closes them.
    return socket.create_server((host, port), family=family, backlog=4096)


async def _serve(server: uvicorn.Server, listen: Listen) -> None:
    sockets = listen.sockets()
    if sockets is None:
        await server.serve()
        return
    try:
        await server.serve(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()


def _watchdog(
    app: GuardApp, engine: int, restart: Callable[[str], Awaitable[None]] | None
) -> EngineWatchdog:
    eng = app.config.engine
    upstream, monitor = app.upstreams[engine], app.monitors[engine]
    return EngineWatchdog(
        upstream.base_url,
        upstream.headers([], False),
        app.engines[engine],
        lambda: monitor.sample,
        upstream.fail_in_flight,
        eng.hang_detect_s,
        restart,
        eng.hang_restart_after_s,
    )


def _uvicorn_server(app: GuardApp, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http=protocol_class(
            app.config.guard, app.config.guard.unavailable_retry_after_s, app.drain
        ),
        lifespan="on",
        access_log=False,
        server_header=False,
        proxy_headers=False,  # the guard reads no X-Forwarded-*; skips a middleware hop
        log_level="warning",
        timeout_graceful_shutdown=math.ceil(app.config.guard.drain_timeout_s),
        backlog=4096,
        # Longer than clients' pools keep idle connections (aiohttp 15 s, httpx 5 s), so a
        # client rarely reuses a connection the guard is closing at that moment.
        timeout_keep_alive=75,
    )
    return uvicorn.Server(config)


@contextlib.contextmanager
def _signals_for_uvicorn(app: GuardApp):
    """uvicorn handles SIGINT/SIGTERM while serving (stop accepting, drain), then re-raises
    the signal into the handlers it found. Have those be no-ops, so the launcher still
    stops vLLM after the drain instead of dying on the re-raised signal. SIGHUP reloads
    the config file (`GuardApp.reload`), reporting to `vllm-guard reload`."""
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    loop = asyncio.get_running_loop()
    status = ReloadStatus()
    loop.add_signal_handler(signal.SIGHUP, reload_now, app, status)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        status.remove()
        for s, handler in previous.items():
            signal.signal(s, handler)


async def serve_with_vllm(
    config: CompiledConfig,
    supervisor: VllmSupervisor,
    engine: EngineState,
    listen: Listen,
    scheduler_metrics_file: Path | None = None,
    engine_key: str | None = None,
) -> int:
    """`scheduler_metrics_file`: where vLLM runs the scheduler plugin, the file it was told
    to write its metrics to; `engine_key`: the key vLLM was started to require."""
    upstream = Upstream(supervisor.base_url, config.guard, config.upstream_api_key, engine_key)
    app = GuardApp(
        config,
        upstream,
        engine,
        scheduler_metrics_file=scheduler_metrics_file,
        metrics_port=listen.metrics_port,
    )
    host, port = listen.host, listen.port
    server = _uvicorn_server(app, host, port)
    watchdog = _watchdog(app, 0, supervisor.kill)
    exit_code = 0

    def on_first_ready(fut: asyncio.Future[None]) -> None:
        nonlocal exit_code
        if fut.cancelled():
            return
        if fut.exception() is not None:
            log.error("%s", fut.exception())
            exit_code = 1
            server.should_exit = True
        else:
            log.warning(
                "vllm-guard ready on http://%s:%s (vLLM at %s, %s)",
                host,
                port,
                supervisor.base_url,
                "with the scheduler plugin"
                if config.engine.scheduler == "guard"
                else "reserved slots, vLLM's scheduler",
            )
            if scheduler_metrics_file is not None and not scheduler_metrics_file.exists():
                log.error(
                    "vLLM started, but the scheduler plugin wrote no %s: is it loaded?",
                    scheduler_metrics_file,
                )

    with _signals_for_uvicorn(app):
        await supervisor.start()
        assert supervisor.first_ready is not None
        supervisor.first_ready.add_done_callback(on_first_ready)
        watching = asyncio.create_task(watchdog.run())
        try:
            await _serve(server, listen)
        finally:
            watching.cancel()
            await supervisor.stop()
    return exit_code


async def serve_proxy(config: CompiledConfig, upstream_urls: Sequence[str], listen: Listen) -> int:
    """Guard engines already running at `upstream_urls` (several: engines serving the same
    model, each followed by its own health poller and watchdog)."""
    upstreams = [
        Upstream(url, config.guard, config.upstream_api_key, config.engine_key)
        for url in upstream_urls
    ]
    engines = [EngineState() for _ in upstreams]
    app = GuardApp(config, upstreams, engines, metrics_port=listen.metrics_port)
    server = _uvicorn_server(app, listen.host, listen.port)
    for upstream in upstreams:
        await _check_upstream(config, upstream)
    tasks = []
    for i, (upstream, engine) in enumerate(zip(upstreams, engines, strict=True)):
        headers = upstream.headers([], False)
        tasks.append(asyncio.create_task(poll_health(engine, upstream.base_url, headers=headers)))
        tasks.append(asyncio.create_task(_watchdog(app, i, None).run()))
    if len(upstreams) > 1:
        log.warning(
            "guarding %d engines: %s", len(upstreams), ", ".join(u.label for u in upstreams)
        )
    with _signals_for_uvicorn(app):
        try:
            await _serve(server, listen)
        finally:
            for task in tasks:
                task.cancel()
    return 0


async def _check_upstream(config: CompiledConfig, upstream: Upstream) -> None:
    """Say what can be known of an upstream's scheduling setup that would void the guard's."""
    engine_headers = upstream.headers([], False)
    policy = await detect_scheduling_policy(upstream.base_url, engine_headers)
    if policy is None:
        log.warning(
            "cannot read the upstream's scheduling policy (vLLM shows it only with "
            "VLLM_SERVER_DEV_MODE=1); it must run with --scheduling-policy priority, or vLLM "
            "ignores the priorities the guard sends"
        )
    elif policy != "priority":
        log.error(
            "the upstream %s runs --scheduling-policy %s: vLLM ignores request priorities; "
            "restart it with --scheduling-policy priority",
            upstream.label,
            policy,
        )
    if config.engine.scheduler == "guard":
        stats = config.engine.scheduler_metrics_file
        if stats is not None and not Path(stats).exists():
            log.error(
                "engine.scheduler: guard, but the plugin's metrics file %s does not exist: "
                "is the upstream running vllm_guard's scheduler? Without it nothing keeps "
                "room for interactive requests (no slot is reserved)",
                stats,
            )
        elif stats is None:
            log.warning(
                "engine.scheduler: guard: no slot or KV share is reserved; the upstream must "
                "run vllm_guard's scheduler plugin (vllm-guard check-config shows how)"
            )
