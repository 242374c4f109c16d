"""Load tests on the user's machine: Locust users (`users`), `vllm-guard tune` (`tune`: the
sweep) and its pure decisions (`recommend`: knee, limits, report)."""
