"""The inference engine: Qwen3-VL on the CPU, one image encoded once for all of a rule's questions."""
