"""Helpers only the benchmarks use: paired, alternating measurement blocks and the report
files every benchmark writes. (Run a benchmark as `python benchmarks/NAME.py`: this folder
is then on the import path.)"""

from __future__ import annotations

import json
import statistics
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any


async def alternating_pairs(
    n: int, measure: Callable[[str], Awaitable[dict[str, Any]]]
) -> list[dict[str, dict[str, Any]]]:
    """`n` pairs of `measure("direct")` and `measure("guard")`, which goes first
    alternating (the machine drifts); for `added_over_pairs`."""
    pairs = []
    for i in range(n):
        pair = {}
        for name in ("direct", "guard") if i % 2 == 0 else ("guard", "direct"):
            pair[name] = await measure(name)
        pairs.append(pair)
    return pairs


def added_over_pairs(pairs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Direct/guard block pairs (each `{"direct": {"p50_ms": ..}, "guard": {..}}`) -> per
    quantile: the median over pairs of guard minus direct (`added_p50_ms`), the lowest and
    highest pair (`added_p50_ms_range`), and each path's median (`direct_p50_ms`)."""
    out: dict[str, Any] = {}
    for q in ("p50_ms", "p99_ms"):
        added = [p["guard"][q] - p["direct"][q] for p in pairs]
        out[f"added_{q}"] = statistics.median(added)
        out[f"added_{q}_range"] = [min(added), max(added)]
        for name in ("direct", "guard"):
            out[f"{name}_{q}"] = statistics.median(p[name][q] for p in pairs)
    return out


def write_report(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """What every benchmark does last: `<name>.json` and `<name>.md` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / name}.json and .md")


# -- KV pressure ------------------------------------------------------------------------


# -- three paths: vLLM alone, the guard with reserved slots, the guard with the plugin -----

PATHS = ("vllm", "reserved", "plugin")
PATH_LABELS = {
    "vllm": "vLLM alone (priority policy)",
    "reserved": "guard, reserved slots",
    "plugin": "guard + scheduler plugin",
    "step_alone": "guard + plugin, urgent_step_alone",
}


def rotations(reps: int, names: tuple[str, ...] = PATHS) -> list[list[str]]:
    """The order of the paths in each repetition: ABC, BCA, CAB, ... (the machine drifts)."""
    return [[*names[i % len(names) :], *names[: i % len(names)]] for i in range(reps)]


def histogram_quantile(
    before: dict[str, float], after: dict[str, float], name: str, cls: str, q: float
) -> tuple[float, int]:
    """(the q-quantile's bucket bound, observations) of histogram `name` for class `cls`
    over what was observed between two scrapes; (nan, 0) if nothing was."""
    prefix = f"{name}_bucket{{class={cls},le="
    buckets = sorted(
        (float(k[len(prefix) : -1]), after[k] - before.get(k, 0.0))
        for k in after
        if k.startswith(prefix)
    )
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound, int(total)
    return float("nan"), int(total)
