"""Prometheus exposition text as the tests, the soak and the benchmarks read it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse_prometheus(text: str) -> dict[str, float]:
    """Exposition text -> {'name{k=v,...}': value}, labels sorted (no quotes)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def total(samples: dict[str, float], name: str, *labels: str) -> float:
    """The sum of `name`'s samples (from `parse_prometheus`) whose labels include every
    one of `labels` ('k=v')."""
    return sum(
        value
        for key, value in samples.items()
        if key.split("{", 1)[0] == name
        and all(label in key[len(name) + 1 : -1].split(",") for label in labels)
    )
