"""`invedit bench kernel`: the attention kernel against every SDPA backend on the SD-1.4 shapes.

What it measures (docs/performance.md): for each controller shape at 4 rows x 8 heads
(self-attention 4096/40, 1024/80, 256/160, 64/160; cross-attention N x 77 at each level) and for
the gathered mode (Q/K/V read from other rows, as MasaCtrl's target rows read the source's K and
V), the median over >= 20 timed runs after warm-up (L2 flushed before each run, CUDA events) of
- our Triton kernel (autotuned; the warm-up runs the autotuner),
- `scaled_dot_product_attention` with each backend forced in turn (cuDNN, flash, efficient, math)
  and with PyTorch's own choice, timed twice to show the noise floor; in the gathered mode the SDPA
  time includes the index_select copy it needs,
- the fp32 reference (benchmarks/attention_reference.py),
reporting TFLOP/s counted with the true head dim (4 B H N_q N_k d), the fraction of the attention
bound (the time no kernel can beat: the max of the matmuls with d padded as FlashAttention pads it
at the measured 798 TFLOP/s, the exponentials at 3.9 T/s, and the Q/K/V/O traffic at the measured
copy bandwidth), and each output's max error against the fp32 reference. A forward+backward
section times the gradient paths (kernels/attention.py: SDPA under "auto"; Triton forward + SDPA
recompute under "triton"). Writes kernel-<device>.json and .md into the output directory.

Without a GPU it says so and runs the interpret-mode smoke set only (correctness at small shapes,
no timings), written as kernel-cpu-interpret.json/.md. The `--static` compile sweep is
benchmarks/kernel_static.py.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.attention_reference import attention_reference
from benchmarks.common import slug, versions
from kernels.attention import fused_attention, fused_attention_rows
from ldm.files import write_bytes, write_json

ROWS, HEADS = 4, 8
# MasaCtrl's mutual self-attention on [u_src, u_tgt, c_src, c_tgt]: targets read the source's K, V
GATHER = ([0, 1, 2, 3], [0, 0, 2, 2], [0, 0, 2, 2])
# (N_q, N_k, head_dim, label)
SELF_SHAPES = [(4096, 4096, 40), (1024, 1024, 80), (256, 256, 160), (64, 64, 160)]
CROSS_SHAPES = [(4096, 77, 40), (1024, 77, 80), (256, 77, 160), (64, 77, 160)]
# The hardware ceilings of the attention bound (docs/performance.md): a bf16 8192^3 matmul measured
# on the H100/H200 machines (the datasheet's 989 TFLOP/s is not reached in practice), the SFU's
# exponential rate on H100, and measured device-to-device copy rates.
PEAK_MATMUL = 798e12
PEAK_EXP = 3.9e12
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


@dataclass(frozen=True)
class Shape:
    n_q: int
    n_k: int
    head_dim: int
    gathered: bool = False

    @property
    def label(self) -> str:
        kind = "cross" if self.n_k == 77 else "self"
        return f"{kind} {self.n_q}x{self.n_k} d={self.head_dim}" + (" gathered" if self.gathered else "")

    @property
    def flops(self) -> float:
        return 4.0 * ROWS * HEADS * self.n_q * self.n_k * self.head_dim

    def bound_s(self, elem_bytes: int, bandwidth: float) -> float:
        """The attention bound: the time no kernel can beat on this shape (module docstring)."""
        padded = next(p for p in (32, 64, 96, 128, 192, 256) if p >= self.head_dim)  # FA-2/3 head-dim buckets
        matmul = 4.0 * ROWS * HEADS * self.n_q * self.n_k * padded / PEAK_MATMUL
        exps = ROWS * HEADS * self.n_q * self.n_k / PEAK_EXP
        traffic = ROWS * HEADS * (2 * self.n_q + 2 * self.n_k) * self.head_dim * elem_bytes / bandwidth
        return max(matmul, exps, traffic)


def shapes() -> list[Shape]:
    plain = [Shape(*s) for s in SELF_SHAPES + CROSS_SHAPES]
    return plain + [Shape(*s, gathered=True) for s in SELF_SHAPES]


# ---------------------------------------------------------------- GPU timing


def _time_ms(fn: Callable[[int], object], warmup: int, repeats: int, flush: Tensor) -> float:
    """Median milliseconds of fn(i) over `repeats` runs after `warmup`; L2 flushed before each."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    events = []
    for i in range(repeats):
        flush.zero_()  # evict the inputs from L2 so each run reads them from HBM
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _providers(shape: Shape, index: list[Tensor]) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """name -> f(q, k, v) computing the shape's attention (gathered if the shape says so);
    index: the GATHER rows as device tensors, made once so no provider times a host copy."""
    from torch.nn.attention import sdpa_kernel

    def sdpa_with(backend):
        def run(q, k, v):
            if shape.gathered:  # the copy a gather-less kernel needs is part of its cost
                q, k, v = (t.index_select(0, r) for t, r in zip((q, k, v), index))
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    def triton(q, k, v):
        if shape.gathered:
            return fused_attention_rows(q, k, v, *index, backend="triton")
        return fused_attention(q, k, v, backend="triton")

    def reference(q, k, v):
        if shape.gathered:
            q, k, v = (t.index_select(0, r) for t, r in zip((q, k, v), index))
        return attention_reference(q, k, v)

    out = {"triton": triton}
    out.update({f"sdpa-{name}": sdpa_with(b) for name, b in _sdpa_backends().items()})
    out["sdpa-default"] = sdpa_with(None)
    out["sdpa-default (repeat)"] = sdpa_with(None)
    out["reference-fp32"] = reference
    return out


def bench_gpu(dtype: torch.dtype, warmup: int, repeats: int) -> dict[str, object]:
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    bandwidth = next((bw for key, bw in BANDWIDTH.items() if key in props.name), BANDWIDTH["H100"])
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
    flush = torch.empty(max(2 * l2, 2**26) // 4, dtype=torch.float32, device=device)
    rows = []
    for shape in shapes():
        gen = torch.Generator(device=device).manual_seed(0)
        per_set = 3 * ROWS * HEADS * shape.n_q * shape.head_dim * torch.finfo(dtype).bits // 8
        sets = max(1, min(8, -(-2 * l2 // max(per_set, 1))))  # rotate inputs so they exceed L2 together
        inputs = [
            tuple(
                torch.randn(ROWS, HEADS, n, shape.head_dim, generator=gen, device=device, dtype=dtype)
                for n in (shape.n_q, shape.n_k, shape.n_k)
            )
            for _ in range(sets)
        ]
        index = [torch.tensor(r, device=device) for r in GATHER]
        providers = _providers(shape, index)
        oracle = providers["reference-fp32"](*inputs[0])
        for name, fn in providers.items():
            row: dict[str, object] = {"shape": shape.label, "provider": name, "dtype": str(dtype).replace("torch.", "")}
            try:
                err = (fn(*inputs[0]).float() - oracle).abs().max().item()
                ms = _time_ms(lambda i: fn(*inputs[i % sets]), warmup, repeats, flush)
            except RuntimeError as exc:  # a forced SDPA backend that does not take this shape
                row["unsupported"] = str(exc).splitlines()[0][:200]
                rows.append(row)
                continue
            bound = shape.bound_s(torch.finfo(dtype).bits // 8, bandwidth)
            row.update(
                median_ms=round(ms, 4),
                tflops=round(shape.flops / (ms * 1e-3) / 1e12, 1),
                fraction_of_bound=round(bound / (ms * 1e-3), 3),
                bound_ms=round(bound * 1e3, 4),
                max_abs_err_vs_fp32=err,
                runs=repeats,
            )
            if name == "triton":
                row["autotuned_config"] = _best_config(shape.head_dim, dtype)
            rows.append(row)
        del inputs, oracle
        torch.cuda.empty_cache()
    rows += bench_backward(dtype, warmup, repeats, flush)
    return {"device": props.name, "rows": rows}


def _best_config(head_dim: int, dtype: torch.dtype) -> str | None:
    from kernels.triton_attention import autotuner

    best = getattr(autotuner(head_dim, dtype), "best_config", None)
    return None if best is None else str(best)


def bench_backward(dtype: torch.dtype, warmup: int, repeats: int, flush: Tensor) -> list[dict[str, object]]:
    """Forward + backward per gradient path (null-text inversion's cost), self-attention shapes."""
    rows = []
    for n, _, d in SELF_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(1)
        q, k, v, g = (torch.randn(ROWS, HEADS, n, d, generator=gen, device="cuda", dtype=dtype) for _ in range(4))
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        for name, backend in (("fwd+bwd auto (sdpa)", "auto"), ("fwd+bwd triton fwd + sdpa recompute", "triton")):

            def step(_i: int, backend=backend) -> None:
                for t in leaves:
                    t.grad = None
                fused_attention(*leaves, backend=backend).backward(g)

            ms = _time_ms(step, warmup, repeats, flush)
            rows.append({"shape": f"self {n}x{n} d={d} backward", "provider": name, "median_ms": round(ms, 4)})
    return rows


# ---------------------------------------------------------------- no GPU: interpreter smoke set


def smoke_interpreted() -> dict[str, object]:
    """Each head dim, self / cross-77 / odd N / gathered rows, in fp16, bf16 and fp32, under the
    CPU interpreter: max error vs the fp32 reference and vs plain same-dtype attention."""
    from benchmarks.triton_interpret import Job, run_interpreted

    cases = []
    gen = torch.Generator().manual_seed(0)
    for d in (40, 80, 160):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for n_q, n_k, gathered in ((64, 64, False), (64, 77, False), (37, 37, False), (45, 77, True)):
                q, k, v = (torch.randn(4, 2, n, d, generator=gen).to(dtype) for n in (n_q, n_k, n_k))
                cases.append((Shape(n_q, n_k, d, gathered), dtype, q, k, v))
    start = time.perf_counter()
    outs = run_interpreted([Job(q, k, v, rows=GATHER if s.gathered else None) for s, _, q, k, v in cases])
    wall = time.perf_counter() - start
    rows = []
    for (shape, dtype, q, k, v), out in zip(cases, outs):
        if shape.gathered:
            q, k, v = (t[r] for t, r in zip((q, k, v), GATHER))
        oracle_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        ref = attention_reference(q, k, v, dtype=oracle_dtype)
        plain = attention_reference(q, k, v, dtype=dtype)
        err = (out.to(oracle_dtype) - ref).abs().max().item()
        plain_err = (plain.to(oracle_dtype) - ref).abs().max().item()
        rows.append(
            {
                "shape": shape.label,
                "dtype": str(dtype).replace("torch.", ""),
                "kernel_err": err,
                "plain_torch_err": plain_err,
                "ratio": round(err / plain_err, 3) if plain_err else None,
            }
        )
    return {"device": "cpu (Triton interpreter)", "interpreter_wall_s": round(wall, 1), "rows": rows}


# ---------------------------------------------------------------- output


def _markdown_gpu(result: dict[str, object]) -> str:
    lines = [
        f"# Attention kernel benchmark on {result['device']}",
        "",
        f"{ROWS} rows x {HEADS} heads; median of the timed runs after warm-up, L2 flushed per run. "
        "TFLOP/s counted with the true head dim; bound = max(padded matmuls at 798 TFLOP/s, "
        "exponentials at 3.9 T/s, Q/K/V/O traffic at the measured copy bandwidth).",
        "",
        "| shape | provider | median ms | TFLOP/s | fraction of bound | max err vs fp32 | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:  # type: ignore[union-attr]
        note = r.get("unsupported") or r.get("autotuned_config") or ""
        lines.append(
            f"| {r['shape']} | {r['provider']} | {r.get('median_ms', '-')} | {r.get('tflops', '-')} | "
            f"{r.get('fraction_of_bound', '-')} | {_fmt(r.get('max_abs_err_vs_fp32'))} | {note} |"
        )
    return "\n".join(lines) + "\n"


def _markdown_smoke(result: dict[str, object]) -> str:
    lines = [
        "# Attention kernel smoke set in the Triton CPU interpreter (no GPU: no timings)",
        "",
        f"Interpreter wall time {result['interpreter_wall_s']} s. Errors are max |out - ref| against the "
        "fp32 reference (fp64 for fp32 inputs); budget: kernel <= 2 x plain torch in the same dtype + floor.",
        "",
        "| shape | dtype | kernel err | plain torch err | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:  # type: ignore[union-attr]
        lines.append(f"| {r['shape']} | {r['dtype']} | {_fmt(r['kernel_err'])} | {_fmt(r['plain_torch_err'])} | {r['ratio']} |")
    return "\n".join(lines) + "\n"


def _fmt(x: object) -> str:
    return "-" if x is None else f"{x:.2e}" if isinstance(x, float) else str(x)


def run_kernel_bench(out_dir: Path, dtype: torch.dtype, warmup: int, repeats: int) -> list[Path]:
    """Time the kernel on the GPU, or run the interpreter smoke set without one; print the table
    and write it as JSON and markdown into out_dir. Returns the two paths."""
    if not torch.cuda.is_available():
        print("no CUDA GPU here: running the interpret-mode smoke set only (correctness, no timings)")
        result = smoke_interpreted()
        name, md = "kernel-cpu-interpret", _markdown_smoke(result)
    else:
        result = bench_gpu(dtype, warmup, repeats)
        name, md = f"kernel-{slug(str(result['device']))}", _markdown_gpu(result)
    result["versions"] = versions()
    print(md)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    write_json(paths[0], result)
    write_bytes(paths[1], md.encode())
    return paths
