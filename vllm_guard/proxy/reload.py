"""Config reload on SIGHUP, and `vllm-guard reload --pid PID` to ask for one and hear back.

A signal carries no answer, so the guard writes the outcome of each reload it attempts to
a small status file named after its PID (in the temp directory, replaced atomically); the
command sends SIGHUP, waits for that file to count one more attempt, prints its message
and exits 0 (reloaded) or 1 (the old config stays).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_guard.config import CompiledConfig, ConfigError

if TYPE_CHECKING:
    from vllm_guard.proxy.app import GuardApp

log = logging.getLogger("vllm_guard.proxy.reload")


def status_path(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"vllm-guard-{pid}.reload.json"


class ReloadStatus:
    """What this process tells `vllm-guard reload` about its reloads."""

    def __init__(self, pid: int | None = None) -> None:
        self.path = status_path(os.getpid() if pid is None else pid)
        self.attempts = 0

    def write(self, ok: bool, message: str) -> None:
        self.attempts += 1
        text = json.dumps({"attempts": self.attempts, "ok": ok, "message": message})
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError as exc:  # the reload itself happened; only the report is lost
            log.warning("cannot write the reload status file %s: %s", self.path, exc)
            Path(tmp).unlink(missing_ok=True)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def describe(old: CompiledConfig, new: CompiledConfig) -> str:
    """One line on what a reload changed, for the log and the command."""
    added = sorted(set(new.tenants) - set(old.tenants))
    removed = sorted(set(old.tenants) - set(new.tenants))
    changed = sorted(
        name
        for name in set(old.tenants) & set(new.tenants)
        if old.tenants[name] != new.tenants[name]
    )
    keys = sorted(
        name
        for name in set(old.tenants) & set(new.tenants)
        if _keys_of(old, name) != _keys_of(new, name)
    )
    classes = sorted(c.name for c in new.classes if c != old.classes_by_name.get(c.name))
    parts = [
        f"{what}: {', '.join(names)}"
        for what, names in (
            ("tenants added", added),
            ("tenants removed", removed),
            ("tenants changed", changed),
            ("keys changed", keys),
            ("classes changed", classes),
        )
        if names
    ]
    return f"{new.source} reloaded: " + ("; ".join(parts) if parts else "nothing changed")


def _keys_of(config: CompiledConfig, tenant: str) -> set[bytes]:
    return {digest for digest, t in config.key_digests.items() if t.name == tenant}


def request_reload(pid: int, timeout_s: float = 10.0) -> tuple[int, str]:
    """Send SIGHUP to the guard `pid` and wait for its answer: (exit code, message)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        args = cmdline.read_bytes()
    except FileNotFoundError:
        return 2, f"no process {pid}"
    except OSError:
        args = b"vllm-guard"  # no /proc to look at: trust the caller
    if b"vllm-guard" not in args and b"vllm_guard" not in args:
        return 2, f"process {pid} is not vllm-guard (SIGHUP would end most programs)"
    path = status_path(pid)
    before = _attempts(_read(path))
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return 2, f"no process {pid}"
    except PermissionError:
        return 2, f"not allowed to signal process {pid} (run as its user)"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = _read(path)
        if answer is not None and _attempts(answer) > before:
            return (0 if answer.get("ok") else 1), str(answer.get("message", ""))
        time.sleep(0.05)
    return 1, f"process {pid} did not report a reload within {timeout_s:g} s"


def _read(path: Path) -> dict[str, object] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _attempts(answer: dict[str, object] | None) -> int:
    """The reload attempts a status file's content counts (0: none or unreadable)."""
    attempts = answer.get("attempts", 0) if answer else 0
    return attempts if isinstance(attempts, int) else 0


def reload_now(app: GuardApp, status: ReloadStatus) -> None:
    """SIGHUP's handler: reload `app`, log and report the outcome."""
    old = app.config
    try:
        new = app.reload()
    except ConfigError as exc:
        log.error("config reload failed; the running config stays in force: %s", exc)
        status.write(False, str(exc))
        return
    except Exception as exc:  # a bug: say so rather than leave the command waiting
        log.exception("config reload failed unexpectedly")
        status.write(False, f"reload failed unexpectedly ({type(exc).__name__}); see the log")
        return
    message = describe(old, new)
    log.warning("%s", message)
    status.write(True, message)
