"""One way to start and stop the whole stack — `vllm-guard serve --model tiny` with vLLM's
CPU build underneath — shared by the demo, the integration tests and the benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from vllm_guard.config import DEFAULT_CONFIG, load_config
from vllm_guard.engine.launcher import free_port
from vllm_guard.engine.middleware import HEADER as ENGINE_KEY_HEADER
from vllm_guard.engine.middleware import KEY_ENV as ENGINE_KEY_ENV


class Stack:
    """`vllm-guard serve --model tiny` as a child process, with keys made up for the run
    (or given)."""

    def __init__(
        self,
        port: int = 0,
        log_dir: Path | None = None,
        config_path: Path | None = None,
        key_vars: tuple[str, ...] = ("CHAT_UI_KEY", "ETL_KEY"),
        vllm_args: tuple[str, ...] = (),
        keys: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        engine_key: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`keys`: use these (variable -> key) instead of making up one per `key_vars`,
        e.g. for a second stack that must accept the first one's clients; `metrics_port`:
        serve /metrics there (`--metrics-port`) rather than on the public port;
        `engine_key`: the key its vLLM requires (default: made up), e.g. the same for two
        engines behind one `vllm-guard proxy`; `env`: more environment for serve and vLLM
        (e.g. `VLLM_CPU_OMP_THREADS_BIND`, so two CPU engines compute on different cores:
        vLLM binds every one to core 0 by default)."""
        self.port = port or free_port()
        self.metrics_port = metrics_port
        self.vllm_port = free_port()
        self.keys = dict(keys) if keys else {var: secrets.token_urlsafe(24) for var in key_vars}
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="vllm-guard-demo-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.vllm_log = self.log_dir / "vllm.log"
        self.guard_log = self.log_dir / "guard.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # The engine answers only this key (serve takes it from its environment): tests,
        # benchmarks and the demo that talk to vLLM directly send `engine_headers`.
        self.engine_key = engine_key or secrets.token_urlsafe(24)
        env = {**os.environ, **(env or {}), **self.keys, ENGINE_KEY_ENV: self.engine_key}
        self.config_path = config_path
        self.vllm_args = vllm_args
        self.config = load_config(config_path, env)
        self._env = env

    @property
    def guard_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine_headers(self) -> dict[str, str]:
        """What a request straight to vLLM's private port needs (the guard's engine key)."""
        return {ENGINE_KEY_HEADER: self.engine_key}

    @property
    def metrics_url(self) -> str:
        """Where /metrics and /metrics/engine are served."""
        return f"http://127.0.0.1:{self.metrics_port}" if self.metrics_port else self.guard_url

    @property
    def vllm_url(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "vllm_guard", "serve", "--model", "tiny",
            "--port", str(self.port), "--vllm-port", str(self.vllm_port),
            "--vllm-log", str(self.vllm_log),
        ]  # fmt: skip
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        if self.metrics_port is not None:
            cmd += ["--metrics-port", str(self.metrics_port)]
        if self.vllm_args:
            cmd += ["--", *self.vllm_args]
        with open(self.guard_log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=self._env, stdout=out, stderr=subprocess.STDOUT)

    def vllm_pids(self) -> tuple[int, int]:
        """vLLM's API server process and its engine core (the child named VLLM::EngineCore),
        for fault tests that stop one of them."""
        assert self.proc is not None
        for api_server in _children(self.proc.pid):
            for child in _children(api_server):
                if b"EngineCore" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return api_server, child
        raise RuntimeError("no vLLM engine-core process found")

    def wait_ready_blocking(self, timeout_s: float = 600) -> None:
        """`wait_ready` for synchronous callers (pytest fixtures)."""
        asyncio.run(self.wait_ready(timeout_s))

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the guard's and vLLM's logs, for a failure message."""
        parts = []
        for p in (self.guard_log, self.vllm_log):
            if p.exists():
                parts.append(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-lines:]))
        return "\n".join(parts)

    async def wait_ready(self, timeout_s: float = 600) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vllm-guard serve exited:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with s.get(self.guard_url + "/health") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.5)
        raise RuntimeError(f"stack not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, 60)


def config_text(path: Path | None = None) -> str:
    """A limits file's text; None: the embedded default's."""
    if path is not None:
        return path.read_text()
    from importlib import resources

    return resources.files("vllm_guard.defaults").joinpath(DEFAULT_CONFIG).read_text()


def with_scheduler(text: str, scheduler: str, **engine: Any) -> str:
    """The same limits with `engine.scheduler` (and any other `engine` keys) set: the
    benchmarks' paths with and without the scheduler plugin, same classes and tenants."""
    raw = yaml.safe_load(text)
    raw.setdefault("engine", {}).update(scheduler=scheduler, **engine)
    return yaml.safe_dump(raw, sort_keys=False)


@contextlib.asynccontextmanager
async def running_stack(config_text: str, **kw: Any) -> AsyncIterator[Stack]:
    """A ready `vllm-guard serve --model tiny` with `config_text` as its limits file
    (keyword arguments go to `Stack`); stopped, and the file removed, on the way out."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_text)
    try:
        stack = Stack(config_path=Path(f.name), **kw)
        stack.start()
        try:
            await stack.wait_ready()
            yield stack
        finally:
            stack.stop()
    finally:
        os.unlink(f.name)


def start_proxy(
    upstream_url: str,
    config_path: Path,
    port: int,
    env: Mapping[str, str],
    log: Path | None = None,
    cwd: Path | None = None,
    preexec_fn: Any = None,
    log_level: str = "info",
    extra_args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """`vllm-guard proxy` in front of an engine already running at `upstream_url`, as a
    child process with `env` added to this one's (keys), its output in `log`; `extra_args`
    go to `proxy`."""
    cmd = [
        sys.executable, "-m", "vllm_guard", "--log-level", log_level, "proxy",
        "--upstream", upstream_url, "--config", str(config_path), "--port", str(port),
        *extra_args,
    ]  # fmt: skip
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60, log: Path | None = None
) -> None:
    """Until `GET url/health` answers 200; raises if `proc` exits or time runs out (with the
    end of `log`, when given)."""
    deadline = time.monotonic() + timeout_s

    def tail() -> str:
        return log.read_text()[-3000:] if log is not None and log.exists() else ""

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited ({proc.returncode}):\n{tail()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not healthy after {timeout_s:.0f} s:\n{tail()}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: Linux)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
