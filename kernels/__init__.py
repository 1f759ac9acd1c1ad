"""Attention kernels, only what runs at inference: fused_attention and its Triton kernel (tooling: benchmarks/)."""
