"""Attention kernels: the fused attention every layer calls, its fp32 reference and benchmark."""
