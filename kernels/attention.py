"""Fused attention, softmax(Q K^T * scale) V (Vaswani et al. 2017, eq. 1), without materialising the probabilities.

Every attention layer of the toolkit ends in one of these two calls (docs/architecture.md):

- `fused_attention(q, k, v)`: plain attention per batch row and head.
- `fused_attention_rows(q, k, v, q_rows, k_rows, v_rows)`: output row b attends with
  Q from input row q_rows[b], K from k_rows[b] and V from v_rows[b]. Every self-attention rule of
  Prompt-to-Prompt (Hertz et al. 2022), MasaCtrl (Cao et al. 2023) and Plug-and-Play (Tumanyan
  et al. 2023) is of this form.

Layout everywhere: (B, heads, N, head_dim).

Which code runs (the `backend` keyword; no global switch):
- "auto" (default): the Triton FlashAttention-2 kernel (kernels/triton_attention.py) for CUDA
  tensors in fp16/bf16/fp32 with head_dim <= 256 and no causal mask, when no gradient is needed
  and the static check found a block config without register spills for that tile and dtype
  (it did for every SD head dim in fp16, bf16 and fp32; fp32 multiplies on the FMA units and only
  small tiles fit, down to 32x16 at d = 160); `torch.nn.functional.scaled_dot_product_attention`
  (SDPA) for everything else: CPU tensors, CLIP's causal attention (causal=True is never sent to
  the kernel), the VAE's single-head d = 512 attention (wider than the kernel's 256 tile),
  float64, and calls that need gradients.
- "sdpa": always SDPA. `fused_attention_rows` gathers the rows first with index_select (a copy of
  the selected rows only).
- "triton": always the Triton kernel; raises ValueError naming the reason if it cannot run these
  inputs (CPU tensors are accepted when TRITON_INTERPRET=1 was set before Triton was imported:
  the CPU interpreter, used by the tests).

Gradients (null-text inversion and the other optimisations run backward through the UNet): the
Triton kernel is forward-only. Under "auto", a call whose inputs require grad (with grad mode on)
goes to SDPA, which has its own fused backward. Under "triton", the forward runs the kernel and
the backward recomputes the attention with SDPA under autograd (`_TritonForward`): correct
gradients, at the price of a second forward.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

RowIndex = Sequence[int] | Tensor
Backend = Literal["auto", "sdpa", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "sdpa", "triton")


def _as_index(rows: RowIndex, device: torch.device, name: str, source_rows: int) -> Tensor:
    """Row indices as a long tensor; sequences and CPU tensors are range-checked (CUDA ones are
    not: that would cost a host sync per call)."""
    index = torch.as_tensor(rows, dtype=torch.long, device=device)
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    if index.device.type == "cpu" and len(index) and (int(index.min()) < 0 or int(index.max()) >= source_rows):
        raise ValueError(f"{name} = {index.tolist()} out of range for {source_rows} input rows")
    return index


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _use_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool, backend: Backend) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    if backend == "sdpa" or (backend == "auto" and not q.is_cuda):
        return False  # decided without importing Triton (absent on some CPU installs)
    try:
        from kernels.triton_attention import unsupported_reason
    except ImportError as err:
        if backend == "triton":
            raise ValueError(f"backend='triton' needs the triton package: {err}") from err
        return False
    reason = "causal masks are left to SDPA (CLIP's text attention)" if causal else unsupported_reason(q, k, v)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
        return True
    return reason is None and not _needs_grad(q, k, v)


class _TritonForward(torch.autograd.Function):
    """Triton forward; backward recomputes with SDPA under autograd (the kernel has no backward)."""

    @staticmethod
    def forward(ctx, q, k, v, q_rows, k_rows, v_rows, scale):  # type: ignore[override]
        from kernels.triton_attention import triton_attention

        rows = None if q_rows is None else (q_rows, k_rows, v_rows)
        ctx.scale = scale
        ctx.gather = rows is not None
        ctx.save_for_backward(q, k, v, *(rows or ()))
        return triton_attention(q, k, v, scale, rows)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, *rows = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
            inputs = leaves
            if ctx.gather:
                inputs = [t.index_select(0, r.long()) for t, r in zip(leaves, rows)]  # (B_out, H, N, d)
            out = F.scaled_dot_product_attention(*inputs, scale=ctx.scale)
            wanted = [t for t, n in zip(leaves, needs) if n]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if n else None for n in needs), None, None, None, None)


def _triton(q: Tensor, k: Tensor, v: Tensor, scale: float, rows: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    q_rows, k_rows, v_rows = rows if rows is not None else (None, None, None)
    if _needs_grad(q, k, v):
        return _TritonForward.apply(q, k, v, q_rows, k_rows, v_rows, scale)
    from kernels.triton_attention import triton_attention

    return triton_attention(q, k, v, scale, rows)


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    backend: Backend = "auto",
) -> Tensor:
    """softmax(q k^T * scale) v over the last two dims; scale defaults to head_dim ** -0.5.

    q (B, heads, N_q, d), k and v (B, heads, N_k, d) -> (B, heads, N_q, d). See the module
    docstring for what `backend` selects.
    """
    if _use_triton(q, k, v, causal, backend):
        return _triton(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, None)
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
    backend: Backend = "auto",
) -> Tensor:
    """Attention whose output row b reads q[q_rows[b]], k[k_rows[b]], v[v_rows[b]].

    The output has len(q_rows) rows. The Triton kernel reads the rows in place through the index
    tensors; the SDPA path gathers them with index_select (a copy of the gathered rows only).
    Row lists are copied to q's device on every call (on CUDA a blocking host-to-device copy);
    callers on the hot path can pass index tensors already on the device, made once.
    """
    qi = _as_index(q_rows, q.device, "q_rows", q.shape[0])
    ki = _as_index(k_rows, q.device, "k_rows", k.shape[0])
    vi = _as_index(v_rows, q.device, "v_rows", v.shape[0])
    if not (len(qi) == len(ki) == len(vi)):
        raise ValueError(f"row index lengths differ: {len(qi)}, {len(ki)}, {len(vi)}")
    if _use_triton(q, k, v, False, backend):
        rows = (qi.to(torch.int32), ki.to(torch.int32), vi.to(torch.int32))
        return _triton(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, rows)
    return F.scaled_dot_product_attention(q.index_select(0, qi), k.index_select(0, ki), v.index_select(0, vi), scale=scale)
