"""The Triton forward kernel of fused attention: FlashAttention-2 (Dao 2023, Algorithm 1) for SD head dims.

out = softmax(Q K^T * scale) V, computed block by block with the online softmax of FlashAttention
(Dao et al. 2022, eq. in §3.1; FA-2 Algorithm 1): for each query block keep the running row max m,
the running denominator l and an fp32 accumulator, rescaled by exp(m_old - m_new) when m grows, so
the N_q x N_k probabilities are never written to memory.

What differs from the Triton tutorial (python/tutorials/06-fused-attention.py), after
flash-attention's `flash_attn_triton.py`:
- head dims that are not powers of two (SD-1.4: 40, 80, 160): Q, K and V are loaded as a
  power-of-two tile (64, 128, 256) with a mask on the head-dim axis; nothing is padded in memory;
- any N_q and N_k (77-token cross-attention keys, odd N): the full key blocks run unmasked and one
  masked tail block follows; query rows past N_q are masked on load and store;
- row gathering: with GATHER, output row b reads Q, K and V from rows QROWS[b], KROWS[b], VROWS[b]
  of the inputs through pointer offsets, without copying them (the self-attention rules of
  Prompt-to-Prompt, Hertz et al. 2022; MasaCtrl, Cao et al. 2023; Plug-and-Play, Tumanyan et al.
  2023; docs/architecture.md);
- arbitrary strides on every input, so (B, N, heads, d) projections viewed as (B, heads, N, d)
  need no copy;
- under TRITON_INTERPRET=1 (CPU), whose interpreter cannot do bf16 arithmetic (it computes on the
  bit patterns, triton-lang/triton#11584), EMULATE_BF16 holds the bf16 tiles in fp32 and rounds P
  to bf16 where the GPU kernel does, so the CPU tests see the GPU's rounding points; it is always
  off when compiled for a GPU;
- exp2 with log2(e) folded into the scale (as the tutorial), fp32 accumulation, and fp32 inputs
  multiplied in IEEE fp32 ("ieee": no TF32, so fp32 keeps fp32 accuracy).

Forward only; kernels/attention.py says what runs for gradients. Block sizes are autotuned,
keyed on (N_Q, N_K, HEAD_DIM) (the autotuner adds the dtypes to the key), over configs checked
offline for register spills and shared memory with ptxas: the recorded sweep is read from
kernels/data/autotune.json (written by `invedit bench kernel --static`, benchmarks/kernel_static.py;
every compile in benchmarks/results/kernel-static.md), and configs that spill are not in it. Uses
only long-standing Triton features; compiled for sm_90a with both 3.9 (CI) and 3.6 (the GPU
machines' version, benchmarks/results/kernel-static-triton3.6.md). Triton 3.6's *interpreter*
cannot run it with numpy 2 (a loop bound computed from a kernel argument is a 1-element array
there); the CPU tests use 3.9's.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # BLOCK_D = 256 is the largest tile the register budget allows (d = 160 in SD)


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def to_triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.num_warps, num_stages=self.num_stages
        )

    def __str__(self) -> str:
        return f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}"


def block_d(head_dim: int) -> int:
    """The power-of-two tile width for a head dim (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def parse_config(name: str) -> BlockConfig:
    """Inverse of str(BlockConfig): "M128-N64-w8-s3"."""
    m, n, w, s = name.split("-")
    return BlockConfig(int(m[1:]), int(n[1:]), int(w[1:]), int(s[1:]))


def autotune_record() -> dict[str, object]:
    """kernels/data/autotune.json, parsed afresh: the recorded ptxas sweep the autotuner draws from.

    Written by `invedit bench kernel --static` (benchmarks/kernel_static.py): "passing" maps
    "d{head_dim}-{fp16|fp32}" to the candidates that compiled for BOTH sm_80 and sm_90a without
    register spills and within shared memory, in candidate order; "excluded" lists as
    "d{head_dim}-{kind}-{config}" the ones a recorded check by another Triton version (3.6, the GPU
    machines' version) saw spill although the sweep's Triton did not.
    """
    return json.loads((resources.files("kernels") / "data" / "autotune.json").read_text())


def _recorded_sweep() -> tuple[Mapping[tuple[int, str], tuple[str, ...]], frozenset[str]]:
    record = autotune_record()
    passing: dict[str, list[str]] = record["passing"]  # type: ignore[assignment]
    excluded: list[str] = record["excluded"]["configs"]  # type: ignore[index]
    by_key: dict[tuple[int, str], tuple[str, ...]] = {}
    for key, names in passing.items():  # "d40-fp16"
        head_dim, kind = key.split("-")
        by_key[(int(head_dim.removeprefix("d")), kind)] = tuple(names)
    return MappingProxyType(by_key), frozenset(excluded)


# Read once at import, read-only. STATIC_OK: (SD head dim, "fp16" | "fp32") -> passing config names.
# STATIC_EXCLUDED: "d80-fp32-M32-N16-w4-s2"-style names never autotuned. bf16 uses the fp16 list
# (same tiles and MMA shapes); other head dims use the list of the SD head dim with the same
# power-of-two tile.
STATIC_OK, STATIC_EXCLUDED = _recorded_sweep()
_SD_HEAD_DIM_OF_TILE = {64: 40, 128: 80, 256: 160}
MAX_AUTOTUNE = 6  # each config costs a compile (~5-10 s) per head dim on first use


def _priority(c: BlockConfig) -> tuple[int, ...]:
    # larger query tiles amortise K/V loads; 64-wide key blocks balance MMA size and softmax
    # registers; more stages hide load latency. Ties: more warps.
    return (-c.block_m, {64: 0, 128: 1, 32: 2, 16: 3}[c.block_n], -c.num_stages, -c.num_warps)


def autotune_configs(head_dim: int, dtype: torch.dtype) -> list[BlockConfig]:
    """The autotuner's candidates for a head dim and dtype: up to MAX_AUTOTUNE passing configs."""
    sd_dim = _SD_HEAD_DIM_OF_TILE[max(64, block_d(head_dim))]
    kind = "fp32" if dtype == torch.float32 else "fp16"
    names = [n for n in STATIC_OK.get((sd_dim, kind), ()) if f"d{sd_dim}-{kind}-{n}" not in STATIC_EXCLUDED]
    ranked = sorted((parse_config(n) for n in names), key=_priority)
    # one pipeline depth per tile shape first, so the few slots cover different tiles
    first: dict[tuple[int, int, int], BlockConfig] = {}
    for c in ranked:
        first.setdefault((c.block_m, c.block_n, c.num_warps), c)
    rest = [c for c in ranked if c not in first.values()]
    return (list(first.values()) + rest)[:MAX_AUTOTUNE]


# The config used when Triton runs in its CPU interpreter (no autotuning there: every config gives
# the same numbers, and timing the interpreter means nothing). BLOCK_N = 32 makes the small test
# shapes cross several key blocks and a masked tail.
INTERPRET_CONFIG = BlockConfig(64, 32, 4, 1)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    start, stop, N_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        # K^T tile (BLOCK_D, BLOCK_N) and V tile (BLOCK_N, BLOCK_D) read in place through strides
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASK_N:
            col_ok = cols < N_K
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if EMULATE_BF16:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), fp32
        if MASK_N:
            # keys past N_K get probability exactly 0; the tail block always holds >= 1 real key
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        # online softmax in base 2: scale * log2(e) is folded into qk_scale, one FMA per element
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if EMULATE_BF16:
            # round p to bf16 where the GPU path does (p.to(v.dtype) below), then hold it in fp32
            p = p.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, QROWS, KROWS, VROWS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    qk_scale, H, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GATHER: tl.constexpr, PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (query blocks, output rows * heads); all heads of all rows in one launch
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = (bh % H).to(tl.int64)
    if GATHER:
        qb = tl.load(QROWS + b).to(tl.int64)
        kb = tl.load(KROWS + b).to(tl.int64)
        vb = tl.load(VROWS + b).to(tl.int64)
    else:
        qb = b.to(tl.int64)
        kb = qb
        vb = qb
    q_base = Q + qb * stride_qb + h * stride_qh
    k_base = K + kb * stride_kb + h * stride_kh
    v_base = V + vb * stride_vb + h * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)
    if EMULATE_BF16:
        q = q.to(tl.float32)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (N_K // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        0, n_full, N_K, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, PRECISION, EMULATE_BF16,
    )
    if n_full < N_K:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            n_full, N_K, N_K, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, PRECISION, EMULATE_BF16,
        )
    acc = acc / l_i[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=io_mask)


@functools.cache
def _autotuner(tile_d: int, fp32: bool):  # -> triton.runtime.Autotuner
    # One autotuned kernel per (tile width, fp32?); Triton's autotuner keeps its own per-key choice.
    configs = [c.to_triton() for c in autotune_configs(tile_d, torch.float32 if fp32 else torch.float16)]
    return triton.autotune(configs, key=["N_Q", "N_K", "HEAD_DIM"])(_attn_fwd)


def autotuner(head_dim: int, dtype: torch.dtype):  # -> triton.runtime.Autotuner
    """The autotuned kernel for this head dim's tile and dtype class."""
    return _autotuner(max(64, block_d(head_dim)), dtype == torch.float32)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def precision(dtype: torch.dtype) -> str:
    # fp16/bf16 ignore it; fp32 inputs would otherwise be rounded to TF32 (10-bit mantissa)
    return "ieee" if dtype == torch.float32 else "tf32"


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the kernel cannot run on these inputs, or None if it can."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected (B, heads, N, head_dim) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}; the kernel takes one of fp16, bf16, fp32"
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        return f"head dims differ: q {d}, k {k.shape[-1]}, v {v.shape[-1]}"
    if d > MAX_HEAD_DIM:
        return f"head_dim {d} > {MAX_HEAD_DIM}"
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        return f"head counts differ: {q.shape[1]}, {k.shape[1]}, {v.shape[1]}"
    if k.shape[2] != v.shape[2] or k.shape[2] == 0:
        return f"k and v need the same non-zero token count, got {k.shape[2]} and {v.shape[2]}"
    if not (q.device == k.device == v.device):
        return f"tensors on different devices: {q.device}, {k.device}, {v.device}"
    if q.is_cuda and not autotune_configs(d, q.dtype):
        return (
            f"no block config for head_dim {d} in {q.dtype} compiles without register spills "
            "(the recorded sweep, kernels/data/autotune.json)"
        )
    if not q.is_cuda and not interpreting():
        return f"tensors on {q.device}: the kernel needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter"
    return None


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    rows: tuple[Tensor, Tensor, Tensor] | None = None,
    config: BlockConfig | None = None,
) -> Tensor:
    """Launch the forward kernel. rows: int32 (q_rows, k_rows, v_rows) on q's device, or None.

    Returns (B_out, heads, N_q, head_dim) in q's dtype, B_out = len(q_rows) or q.shape[0].
    config fixes the block sizes (otherwise autotuned; the interpreter uses INTERPRET_CONFIG).
    Inputs are assumed checked with `unsupported_reason`.
    """
    heads, n_q, d = q.shape[1], q.shape[2], q.shape[3]
    n_k = k.shape[2]
    b_out = q.shape[0] if rows is None else rows[0].shape[0]
    out = torch.empty((b_out, heads, n_q, d), dtype=q.dtype, device=q.device)  # (B_out, H, N_q, d)
    if b_out == 0 or n_q == 0:
        return out
    qr, kr, vr = rows if rows is not None else (q, q, q)  # unread when GATHER is False
    bd = block_d(d)
    args = (
        q, k, v, out, qr, kr, vr,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        scale * LOG2E, heads, n_q, n_k,
    )
    meta = dict(
        HEAD_DIM=d,
        BLOCK_D=bd,
        GATHER=rows is not None,
        PRECISION=precision(q.dtype),
        EMULATE_BF16=interpreting() and q.dtype == torch.bfloat16,
    )
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        grid = (triton.cdiv(n_q, config.block_m), b_out * heads)
        kwargs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps)
        if not interpreting():
            kwargs["num_stages"] = config.num_stages
        _attn_fwd[grid](*args, **meta, **kwargs)
    else:
        autotuner(d, q.dtype)[lambda m: (triton.cdiv(n_q, m["BLOCK_M"]), b_out * heads)](*args, **meta)
    return out
