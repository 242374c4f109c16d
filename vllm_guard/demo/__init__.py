"""`vllm-guard demo` (`run`) and its workload (`workload`: the batch flood and interactive
probes, straight to vLLM and through the guard), which benchmarks/ reuse."""
