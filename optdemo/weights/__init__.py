"""The weights on disk: checkpoints read in place, the .bin -> safetensors conversion cache, CPU
quantization, and putting tensors into modules."""
