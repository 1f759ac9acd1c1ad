"""Plain-PyTorch attention, softmax(Q K^T * scale) V (Vaswani et al. 2017, eq. 1): the kernels' test oracle.

Written out as matmul -> softmax -> matmul with nothing fused, so it shares no code with the
kernels it checks. `dtype` is the precision it computes in: float32 (the default) is the oracle
for fp16/bf16 kernels; float64 for checking fp32 kernels; passing the inputs' own dtype gives
"plain torch attention in that dtype", the yardstick of the tests' error budget (a kernel may be
at most about twice as far from the oracle as plain attention in the same dtype, the rule of
flash-attention's tests). `invedit bench kernel` times it and measures every provider against it.
It is never used at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """q (B, heads, N_q, d), k and v (B, heads, N_k, d) -> (B, heads, N_q, d) in `dtype`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, heads, N_q, N_k)
    if causal:
        n_q, n_k = scores.shape[-2:]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v
