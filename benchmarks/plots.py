"""PNG plots for benchmark results (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def timelines(
    path: Path,
    title: str,
    series: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
) -> Path:
    """One panel per metric, one line per run: `series[metric][run] = [(t, y), ...]`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(9, 2.6 * len(series)), sharex=True)
    axes = axes if len(series) > 1 else [axes]
    for ax, (metric, runs) in zip(axes, series.items(), strict=True):
        for run, points in runs.items():
            xs = [p[0] for p in points]
            ys = [p[1] for p in points]
            ax.plot(xs, ys, label=run, linewidth=1.4, drawstyle="steps-post")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds since the flood started")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
