"""Engine adapters: the only modules that import sglang or vllm."""
