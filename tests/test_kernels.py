"""The Triton attention kernel (run in Triton's CPU interpreter) and the dispatch of fused_attention.

Oracle: benchmarks/attention_reference.py, plain matmul-softmax-matmul in float32 (float64 for
fp32 inputs), sharing no code with the kernel. Error budget (the rule of flash-attention's tests):
the kernel's max error against the oracle is at most twice the error of plain attention computed
in the inputs' own dtype, plus a small absolute floor.

The interpreted runs happen in one child process with TRITON_INTERPRET=1
(benchmarks/triton_interpret.py), so this test session keeps importing Triton normally. Shapes are small (N <= 77, 2 rows x 2
heads) to keep the interpreter fast: the whole module takes about 15 s on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention import fused_attention, fused_attention_rows
from benchmarks.triton_interpret import Job, run_interpreted
from benchmarks.attention_reference import attention_reference

HEAD_DIMS = (40, 64, 80, 160)  # SD-1.4 (8 heads per level) and SD-2.x (64-wide heads everywhere)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (N_q, N_k): self-attention with a whole number of key blocks, cross-attention's 77 keys, odd N
SHAPES = {"self64": (64, 64), "cross77": (64, 77), "odd37": (37, 37)}
ROWS = ([1, 0, 2, 2], [0, 0, 1, 2], [2, 1, 0, 0])  # output row b reads q[.][b], k[.][b], v[.][b]
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _inputs(seed: int, n_q: int, n_k: int, d: int, dtype: torch.dtype, batch: int = 2, heads: int = 2):
    gen = torch.Generator().manual_seed(seed)
    # scale 2 on q gives peaked softmax rows, where the online max-rescaling matters
    q = 2 * torch.randn(batch, heads, n_q, d, generator=gen)
    k = torch.randn(batch, heads, n_k, d, generator=gen)
    v = torch.randn(batch, heads, n_k, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def _errors(out: torch.Tensor, q, k, v, rows=None, scale=None) -> tuple[float, float]:
    """(kernel error, plain same-dtype attention error) against the oracle."""
    if rows is not None:
        q, k, v = q[rows[0]], k[rows[1]], v[rows[2]]  # (len(rows), H, N, d)
    ref = attention_reference(q, k, v, scale=scale, dtype=_oracle_dtype(q.dtype))
    plain = attention_reference(q, k, v, scale=scale, dtype=q.dtype)
    kernel_err = (out.to(ref.dtype) - ref).abs().max().item()
    plain_err = (plain.to(ref.dtype) - ref).abs().max().item()
    return kernel_err, plain_err


def _assert_in_budget(out, q, k, v, rows=None, scale=None) -> None:
    assert out.dtype == q.dtype
    kernel_err, plain_err = _errors(out, q, k, v, rows, scale)
    budget = 2 * plain_err + FLOOR[q.dtype]
    assert kernel_err <= budget, f"kernel error {kernel_err:.3g} > budget {budget:.3g} (plain {plain_err:.3g})"


# ---- every case is run by one interpreter child process, shared through a module fixture ----

def _cases() -> dict[str, tuple[Job, tuple]]:
    cases: dict[str, tuple[Job, tuple]] = {}
    seed = 0
    for d in HEAD_DIMS:
        for dtype in DTYPES:
            for shape_name, (n_q, n_k) in SHAPES.items():
                seed += 1
                q, k, v = _inputs(seed, n_q, n_k, d, dtype)
                cases[f"{shape_name}-d{d}-{dtype}"] = (Job(q, k, v), (q, k, v, None))
            seed += 1
            q, k, v = _inputs(seed, 45, 77, d, dtype, batch=3)
            cases[f"rows-d{d}-{dtype}"] = (Job(q, k, v, rows=ROWS), (q, k, v, ROWS))
    # other block sizes: BLOCK_N 64/128 over 77 keys (one full block + tail, tail only), BLOCK_M 128
    for m, n in ((64, 64), (64, 128), (128, 32)):
        q, k, v = _inputs(100 + m + n, 70, 77, 40, torch.float16)
        cases[f"config-M{m}-N{n}"] = (Job(q, k, v, config=(m, n)), (q, k, v, None))
    # strided inputs: (B, N, heads, d) projections viewed as (B, heads, N, d), no copy
    gen = torch.Generator().manual_seed(200)
    q, k, v = (torch.randn(2, 50, 4, 80, generator=gen).half().transpose(1, 2) for _ in range(3))  # (2, 4, 50, 80)
    cases["strided"] = (Job(q, k, v), (q, k, v, None))
    q, k, v = _inputs(201, 33, 77, 40, torch.float32)
    cases["scale"] = (Job(q, k, v, scale=0.3), (q, k, v, None))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def interpreted() -> dict[str, torch.Tensor]:
    names = list(CASES)
    outs = run_interpreted([CASES[n][0] for n in names])
    return dict(zip(names, outs))


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith(("self", "cross", "odd"))])
def test_kernel_within_error_budget_of_fp32_reference(interpreted, name):
    q, k, v, _ = CASES[name][1]
    _assert_in_budget(interpreted[name], q, k, v)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("rows")])
def test_gathered_rows_read_q_k_v_from_the_named_rows(interpreted, name):
    q, k, v, rows = CASES[name][1]
    assert interpreted[name].shape == (len(rows[0]), *q.shape[1:])
    _assert_in_budget(interpreted[name], q, k, v, rows)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("config")])
def test_other_block_sizes_mask_the_77_key_tail(interpreted, name):
    q, k, v, _ = CASES[name][1]
    _assert_in_budget(interpreted[name], q, k, v)


def test_strided_views_and_explicit_scale(interpreted):
    q, k, v, _ = CASES["strided"][1]
    assert not q.is_contiguous()
    _assert_in_budget(interpreted["strided"], q, k, v)
    q, k, v, _ = CASES["scale"][1]
    _assert_in_budget(interpreted["scale"], q, k, v, scale=0.3)


def test_forced_triton_backward_matches_reference_gradients():
    """backend='triton' with inputs requiring grad: Triton forward, SDPA-recompute backward."""
    q, k, v = _inputs(300, 20, 77, 40, torch.float32)
    gen = torch.Generator().manual_seed(301)
    g = torch.randn(3, 2, 20, 40, generator=gen)
    rows = ([1, 0, 1], [0, 0, 1], [1, 1, 0])
    out, dq, dk, dv = run_interpreted([Job(q, k, v, rows=rows, grad_out=g)])[0]
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(leaves[0][rows[0]], leaves[1][rows[1]], leaves[2][rows[2]], dtype=torch.float64)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=1e-5)
    for got, leaf in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=0, atol=1e-5)


# ---- dispatch and the SDPA path (no interpreter needed) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_path_rows_match_reference(dtype):
    q, k, v = _inputs(400, 45, 77, 80, dtype, batch=3)
    out = fused_attention_rows(q, k, v, *ROWS, backend="sdpa")
    _assert_in_budget(out, q, k, v, ROWS)
    auto = fused_attention_rows(q, k, v, *(torch.tensor(r) for r in ROWS))  # CPU: auto is SDPA
    torch.testing.assert_close(auto, out, rtol=0, atol=0)


def test_causal_and_wide_heads_go_to_sdpa():
    """CLIP's causal d=64 and the VAE's single-head d=512 attention are SDPA calls (docstring)."""
    q, k, v = _inputs(401, 77, 77, 64, torch.float32)
    out = fused_attention(q, k, v, causal=True)
    ref = attention_reference(q, k, v, causal=True, dtype=torch.float64)
    assert (out.double() - ref).abs().max().item() < 1e-5
    q, k, v = _inputs(402, 16, 16, 512, torch.float32, batch=1, heads=1)
    with pytest.raises(ValueError, match="head_dim 512"):
        fused_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="causal"):
        fused_attention(q, k, v, causal=True, backend="triton")


def test_bad_backend_and_rows_are_rejected():
    q, k, v = _inputs(403, 8, 8, 40, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        fused_attention(q, k, v, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        fused_attention_rows(q, k, v, [0, 2], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="lengths differ"):
        fused_attention_rows(q, k, v, [0, 1], [0], [0, 1])


def test_triton_on_cpu_without_interpreter_is_refused():
    from kernels.triton_attention import interpreting

    if interpreting():
        pytest.skip("this session itself runs under TRITON_INTERPRET=1")
    q, k, v = _inputs(404, 8, 8, 40, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_attention(q, k, v, backend="triton")
