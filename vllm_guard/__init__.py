"""vllm-guard: admission control and priority scheduling in front of vLLM."""

__version__ = "0.1.0"
