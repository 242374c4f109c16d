"""What runs on a user's machine: a rate-limited client for any OpenAI-compatible server
(`LimitedClient`, in `limited.py`) and the batch runner built on it (`batch.py`,
`vllm-guard batch`)."""

from vllm_guard.client.limited import ClientStats, LimitedClient, Response, RetriesExhausted

__all__ = ["ClientStats", "LimitedClient", "Response", "RetriesExhausted"]
