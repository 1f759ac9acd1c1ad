"""Fused attention, softmax(Q K^T * scale) V, without materialising the probabilities.

Every attention layer of the toolkit ends in one of these two calls (DESIGN.md §5, §7):

- `fused_attention(q, k, v)`: plain attention per batch row and head.
- `fused_attention_rows(q, k, v, q_rows, k_rows, v_rows)`: output row b attends with
  Q from input row q_rows[b], K from k_rows[b] and V from v_rows[b]. Every self-attention rule of
  P2P, MasaCtrl and Plug-and-Play is of this form (ALGORITHMS.md part B §6.1).

Layout everywhere: (B, heads, N, head_dim). This file holds the dispatch and the
`scaled_dot_product_attention` path used off CUDA.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

RowIndex = Sequence[int] | Tensor


def _as_index(rows: RowIndex, device: torch.device) -> Tensor:
    return torch.as_tensor(rows, dtype=torch.long, device=device)


def fused_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, causal: bool = False
) -> Tensor:
    """softmax(q k^T * scale) v over the last two dims; scale defaults to head_dim ** -0.5."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)


def fused_attention_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_rows: RowIndex,
    k_rows: RowIndex,
    v_rows: RowIndex,
    *,
    scale: float | None = None,
) -> Tensor:
    """Attention whose output row b reads q[q_rows[b]], k[k_rows[b]], v[v_rows[b]].

    The output has len(q_rows) rows. Off CUDA the rows are gathered with index_select (a copy of
    the gathered rows only) and handed to SDPA.
    """
    qi, ki, vi = (_as_index(r, q.device) for r in (q_rows, k_rows, v_rows))
    if not (len(qi) == len(ki) == len(vi)):
        raise ValueError(f"row index lengths differ: {len(qi)}, {len(ki)}, {len(vi)}")
    return fused_attention(q.index_select(0, qi), k.index_select(0, ki), v.index_select(0, vi), scale=scale)
