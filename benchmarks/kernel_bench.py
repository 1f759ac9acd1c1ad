"""`invedit bench kernel`: the attention kernel against every SDPA backend on the SD-1.4 shapes.

What it measures (PERFORMANCE.md §6, metrics 1 and 2): for each controller shape at 4 rows x 8
heads (self-attention 4096/40, 1024/80, 256/160, 64/160; cross-attention N x 77 at each level) and
for the gathered mode (Q/K/V read from other rows, as MasaCtrl's target rows read the source's K
and V), the median over >= 20 timed runs after warm-up (L2 flushed before each run, CUDA events) of
- our Triton kernel (autotuned; the warm-up runs the autotuner),
- `scaled_dot_product_attention` with each backend forced in turn (cuDNN, flash, efficient, math)
  and with PyTorch's own choice, timed twice to show the noise floor; in the gathered mode the SDPA
  time includes the index_select copy it needs,
- the fp32 reference (kernels/reference.py),
reporting TFLOP/s counted with the true head dim (4 B H N_q N_k d), the fraction of the bound of
PERFORMANCE.md §4.1/§6 (max of: matmuls with d padded as FlashAttention pads it at the measured
798 TFLOP/s, exponentials at 3.9 T/s, Q/K/V/O traffic at the measured copy bandwidth), and each
output's max error against the fp32 reference. A forward+backward section times the gradient
paths (kernels/attention.py: SDPA under "auto"; Triton forward + SDPA recompute under "triton").
Writes benchmarks/results/kernel-<device>.json and .md.

Without a GPU it says so and runs the interpret-mode smoke set only (correctness at small shapes,
no timings); `--static` compiles every candidate block config for sm_80 and sm_90a and records
registers, spills and shared memory (kernels/static_check.py) in kernel-static.json/.md.
"""

from __future__ import annotations

import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.attention import fused_attention, fused_attention_rows
from benchmarks.attention_reference import attention_reference

ROWS, HEADS = 4, 8
# MasaCtrl's mutual self-attention on [u_src, u_tgt, c_src, c_tgt]: targets read the source's K, V
GATHER = ([0, 1, 2, 3], [0, 0, 2, 2], [0, 0, 2, 2])
# (N_q, N_k, head_dim, label)
SELF_SHAPES = [(4096, 4096, 40), (1024, 1024, 80), (256, 256, 160), (64, 64, 160)]
CROSS_SHAPES = [(4096, 77, 40), (1024, 77, 80), (256, 77, 160), (64, 77, 160)]
PEAK_MATMUL = 798e12  # bf16 matmul measured on the workplace's H100/H200 (PERFORMANCE.md §5.1)
PEAK_EXP = 3.9e12  # MUFU exponentials per second on H100 (§4.1)
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}  # measured device-to-device copy rates (§5.1)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


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
        """PERFORMANCE.md §6 metric 2: the time no kernel can beat on this shape."""
        padded = next(p for p in (32, 64, 96, 128, 192, 256) if p >= self.head_dim)  # FA-2/3 head-dim buckets
        matmul = 4.0 * ROWS * HEADS * self.n_q * self.n_k * padded / PEAK_MATMUL
        exps = ROWS * HEADS * self.n_q * self.n_k / PEAK_EXP
        traffic = ROWS * HEADS * (2 * self.n_q + 2 * self.n_k) * self.head_dim * elem_bytes / bandwidth
        return max(matmul, exps, traffic)


def shapes() -> list[Shape]:
    plain = [Shape(*s) for s in SELF_SHAPES + CROSS_SHAPES]
    return plain + [Shape(*s, gathered=True) for s in SELF_SHAPES]


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


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
        "TFLOP/s counted with the true head dim; bound = PERFORMANCE.md §6 metric 2.",
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


def _versions() -> dict[str, str]:
    import triton

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}


def run_static(out_dir: Path, jobs: int) -> None:
    """Compile the candidates for sm_80 and sm_90a in two phases to bound the time (each compile
    is 10-60 s on 2 cores): phase 1 the two-stage configs whose register estimate is plausible,
    phase 2 the three-stage variants of those that passed on both archs (stages change shared
    memory, barely registers). bf16 shares fp16's tiles and MMA shapes, so it uses the fp16 list."""
    from benchmarks.kernel_static import (
        REGISTER_ESTIMATE_LIMIT,
        estimate_registers,
        markdown_table,
        passing_configs,
        sweep,
    )
    from kernels.triton_attention import BlockConfig, block_d, candidate_configs
    from ldm.files import write_bytes, write_json

    start = time.perf_counter()
    results, skipped = [], []
    for d in (40, 80, 160):
        for dtype in (torch.float16, torch.float32):
            eb = torch.finfo(dtype).bits // 8
            phase1 = []
            for c in candidate_configs():
                est = estimate_registers(c, block_d(d), eb)
                if c.num_stages != 2:
                    continue
                if est > REGISTER_ESTIMATE_LIMIT:
                    skipped.append({"head_dim": d, "dtype": str(dtype), "config": str(c), "estimated_registers": est,
                                    "skipped": f"estimate > {REGISTER_ESTIMATE_LIMIT}"})
                else:
                    phase1.append(c)
            first = sweep((d,), (dtype,), phase1, jobs=jobs)
            ok = passing_configs(first).get((d, first[0].dtype), []) if first else []
            stage3 = [BlockConfig(c.block_m, c.block_n, c.num_warps, 3) for c in phase1 if str(c) in ok]
            skipped += [{"head_dim": d, "dtype": str(dtype), "config": str(BlockConfig(c.block_m, c.block_n, c.num_warps, 3)),
                         "skipped": "its two-stage variant failed"} for c in phase1 if str(c) not in ok]
            results += first + (sweep((d,), (dtype,), stage3, jobs=jobs) if stage3 else [])
            print(f"static check d={d} {dtype}: {len(results)} compiled so far, {time.perf_counter() - start:.0f} s", flush=True)
    passing = passing_configs(results)
    write_json(
        out_dir / "kernel-static.json",
        {
            "versions": _versions(),
            "wall_s": round(time.perf_counter() - start, 1),
            "passing": {f"d{d}-{t}": names for (d, t), names in passing.items()},
            "results": [r.to_dict() for r in results],
            "skipped": skipped,
        },
    )
    header = (
        "# Static compile check of the attention kernel (no GPU)\n\n"
        "`triton.compile` for each target, registers and spills from `ptxas -v` on the PTX, shared memory "
        "from the compiled metadata (kernels/static_check.py; `invedit bench kernel --static`). ok = no spills "
        "and shared memory within the per-block limit (sm_80 166912 B, sm_90a 232448 B). Configs not compiled "
        "(register estimate too high, or their two-stage variant failed) are listed in kernel-static.json.\n\n"
    )
    summary = "\n".join(f"- d={d} {t}: {', '.join(names) or 'none'}" for (d, t), names in passing.items())
    write_bytes(
        out_dir / "kernel-static.md",
        (header + "Passing on both archs:\n\n" + summary + "\n\n" + markdown_table(results)).encode(),
    )
    print(f"static check: {len(results)} compiles, written to {out_dir}/kernel-static.json and .md")


def main(argv: list[str] | None = None) -> int:
    from ldm.errors import ArgumentParser

    parser = ArgumentParser(prog="invedit bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="kernel", choices=["kernel"], help="what to benchmark")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default benchmarks/results)")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per provider (>= 20)")
    parser.add_argument("--static", action="store_true", help="compile every config for sm_80/sm_90a; no GPU needed")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes for --static")
    args = parser.parse_args(argv)
    from ldm.errors import UsageError
    from ldm.files import write_bytes, write_json

    if args.repeats < 20:
        raise UsageError(f"--repeats {args.repeats}: need at least 20 timed runs for a median")
    if args.static:
        run_static(args.out, args.jobs)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU here: running the interpret-mode smoke set only (correctness, no timings)")
        result = smoke_interpreted()
        name, md = "kernel-cpu-interpret", _markdown_smoke(result)
    else:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        result = bench_gpu(dtype, args.warmup, args.repeats)
        name, md = f"kernel-{device_slug(str(result['device']))}", _markdown_gpu(result)
    result["versions"] = _versions()
    write_json(args.out / f"{name}.json", result)
    write_bytes(args.out / f"{name}.md", md.encode())
    print(md)
    print(f"written: {args.out / name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
