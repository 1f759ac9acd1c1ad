"""The ptxas compile sweep: compile the attention kernel for sm_80 and sm_90a without a GPU and read its register use.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin) with no driver: the target is given, not queried. The compiled
object knows its shared memory (`metadata.shared`) but registers and spills are only reported by
the driver at load time, so they are read from `ptxas -v` on the PTX, with the ptxas that Triton
itself uses for that architecture (shipped in the wheel). A config passes when ptxas reports no
spill stores or loads and its shared memory fits the architecture's per-block limit; a spilling
attention kernel loses most of its speed (register spills go to local memory, i.e. HBM traffic
inside the inner loop), so only passing configs are autotuned.

`invedit bench kernel --static` runs `run_sweep`: it writes kernel-static.json/.md (every compile)
and autotune.json, the record the kernel reads its autotune candidates from: the passing lists,
minus the configs that a recorded check by another Triton version saw fail. The shipped copy is
kernels/data/autotune.json; after a new sweep, copy the written autotune.json there (and the
sweep's files to benchmarks/results/): tests/test_kernels_static.py checks that the shipped record
is exactly what `make_autotune_record` makes of the recorded results.

Numbers are for the Triton version installed where this runs (3.9 in CI); the GPU machines run
3.6, whose code generation can differ a little (benchmarks/results/kernel-static-triton3.6.json).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import versions
from kernels.triton_attention import BlockConfig, _attn_fwd, autotune_record, block_d, parse_config, precision
from ldm.errors import UsageError
from ldm.files import write_bytes, write_json


def candidate_configs() -> list[BlockConfig]:
    """Every block configuration the sweep considers: the Triton tutorial's grid widened to the
    small tiles that d = 160 (a 256-wide tile) and fp32 need to stay within 255 registers."""
    return [
        BlockConfig(m, n, w, s)
        for m in (32, 64, 128)
        for n in (16, 32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


# Max dynamic shared memory per block (CUDA programming guide, compute capability table).
SHARED_LIMIT = {80: 166912, 90: 232448}
ARCHS = (80, 90)
_TL_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class StaticResult:
    arch: str  # "sm_80" / "sm_90a"
    head_dim: int
    dtype: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    shared_limit: int
    compile_s: float

    @property
    def ok(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and self.shared_bytes <= self.shared_limit

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def _ptxas(capability: int) -> str:
    """The ptxas Triton uses for this architecture (sm_90+ uses the newer 'ptxas-blackwell')."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return str(get_ptxas(capability).path)
    except (ImportError, AttributeError):  # older Triton: one ptxas in the wheel's bin/
        import triton

        found = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
        return str(found) if found.exists() else (shutil.which("ptxas") or "ptxas")


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of the kernel in `ptx`, from `ptxas -v`."""
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [_ptxas(capability), f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = proc.stdout + proc.stderr
    regs, spill = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not read registers/spills from ptxas output:\n{log}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def compile_config(head_dim: int, dtype: torch.dtype, config: BlockConfig, capability: int) -> StaticResult:
    """Compile the gathering variant (a superset of the plain one) for one target and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d(head_dim),
        GATHER=True,
        PRECISION=precision(dtype),
        EMULATE_BF16=False,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
    )
    signature = {name: "i32" for name in _attn_fwd.arg_names}  # strides, H, N_Q, N_K
    signature.update({name: f"*{_TL_TYPE[dtype]}" for name in ("Q", "K", "V", "O")})
    signature.update({name: "*i32" for name in ("QROWS", "KROWS", "VROWS")})
    signature["qk_scale"] = "fp32"
    signature.update({name: "constexpr" for name in constexprs})
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton 3.9's FP-fusion default notice
        compiled = triton.compile(
            ASTSource(_attn_fwd, signature, constexprs=constexprs),
            target=GPUTarget("cuda", capability, 32),
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
        )
    regs, spill_st, spill_ld = ptxas_usage(compiled.asm["ptx"], capability)
    return StaticResult(
        arch="sm_90a" if capability == 90 else f"sm_{capability}",
        head_dim=head_dim,
        dtype=_TL_TYPE[dtype],
        config=str(config),
        registers=regs,
        spill_stores=spill_st,
        spill_loads=spill_ld,
        shared_bytes=int(compiled.metadata.shared),
        shared_limit=SHARED_LIMIT[capability],
        compile_s=round(time.perf_counter() - start, 2),
    )


def markdown_table(results: list[StaticResult]) -> str:
    lines = [
        "| arch | head dim | dtype | config (BLOCK_M-BLOCK_N-warps-stages) | registers | spill st/ld (B) | shared (B) | ok |",
        "|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.arch} | {r.head_dim} | {r.dtype} | {r.config} | {r.registers} | "
            f"{r.spill_stores}/{r.spill_loads} | {r.shared_bytes} | {'yes' if r.ok else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def _compile_job(job: tuple[int, str, str, int]) -> StaticResult:
    head_dim, dtype_name, config_name, capability = job
    dtype = {v: k for k, v in _TL_TYPE.items()}[dtype_name]
    return compile_config(head_dim, dtype, parse_config(config_name), capability)


def sweep(
    head_dims: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...],
    configs: list[BlockConfig],
    archs: tuple[int, ...] = ARCHS,
    jobs: int = 1,
) -> list[StaticResult]:
    """compile_config over the product, in `jobs` processes (each compile is single-threaded)."""
    work = [(d, _TL_TYPE[t], str(c), a) for a in archs for d in head_dims for t in dtypes for c in configs]
    if jobs <= 1:
        return [_compile_job(job) for job in work]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_compile_job, work, chunksize=1)


REGISTER_ESTIMATE_LIMIT = 210


def estimate_registers(config: BlockConfig, tile_d: int, elem_bytes: int) -> int:
    """A rough per-thread register count: fp32 accumulator + scores + Q tile, spread over the
    threads, plus fixed overhead. It undercounts by ~60 (d=40, M128-N64-w8: 136 vs ptxas 196),
    so configs above REGISTER_ESTIMATE_LIMIT are not worth a 20-60 s ptxas run: they spill."""
    m, n, threads = config.block_m, config.block_n, 32 * config.num_warps
    return int((m * tile_d + 1.5 * m * n + m * tile_d * elem_bytes / 4) / threads + 40)


def passing_configs(results: list[StaticResult]) -> dict[tuple[int, str], list[str]]:
    """(head_dim, dtype) -> configs that pass on every architecture swept, in candidate order."""
    by_key: dict[tuple[int, str], dict[str, bool]] = {}
    for r in results:
        ok = by_key.setdefault((r.head_dim, r.dtype), {})
        ok[r.config] = ok.get(r.config, True) and r.ok
    return {key: [c for c, good in oks.items() if good] for key, oks in by_key.items()}


# ---------------------------------------------------------------- the sweep command and its records

SD_HEAD_DIMS = (40, 80, 160)
AUTOTUNE_WHAT = (
    "Block configs of the Triton attention kernel (kernels/triton_attention.py) that compile for sm_80 and sm_90a "
    "without register spills and within shared memory, per SD head dim and element width, in candidate order "
    "(bf16 uses the fp16 lists), minus the excluded ones: the kernel autotunes over these. Written by "
    "`invedit bench kernel --static` (benchmarks/kernel_static.py)."
)


def exclusions_from(check: dict[str, object]) -> dict[str, object]:
    """The `excluded` entry of an autotune record, from a recorded compile check by another Triton
    version (a JSON object with "what", "versions" and "failing", as kernel-static-triton3.6.json)."""
    triton_version = check["versions"]["triton"]  # type: ignore[index]
    return {
        "triton": triton_version,
        "why": f"fail in a compile check by Triton {triton_version}: {check['what']}",
        "configs": sorted(check["failing"]),  # type: ignore[arg-type]
    }


def load_exclusions(check_file: Path | None) -> dict[str, object]:
    """The `excluded` entry for a new autotune.json: from `check_file` (a recorded check by another
    Triton version) or, without one, the installed kernels/data/autotune.json's: this sweep cannot
    re-derive what another Triton version compiles, so a new sweep must not silently drop them.
    A bad file is a UsageError, raised before the sweep spends its minutes."""
    if check_file is None:
        return autotune_record()["excluded"]  # type: ignore[return-value]
    try:
        return exclusions_from(json.loads(check_file.read_text()))
    except OSError as err:
        raise UsageError(f"--exclude-from {check_file}: cannot read it ({err.strerror})") from err
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(
            f"--exclude-from {check_file}: not a recorded compile check (a JSON object with 'what', "
            f"'versions' and 'failing'): {type(err).__name__} {err}"
        ) from err


def make_autotune_record(sweep_result: dict[str, object], excluded: dict[str, object]) -> dict[str, object]:
    """What autotune.json holds, from a sweep's kernel-static.json object and an `excluded` entry."""
    return {
        "what": AUTOTUNE_WHAT,
        "sweep_versions": sweep_result["versions"],
        "passing": sweep_result["passing"],
        "excluded": excluded,
    }


def run_sweep(out_dir: Path, jobs: int, excluded: dict[str, object]) -> list[Path]:
    """Compile the candidates for sm_80 and sm_90a in two phases to bound the time (each compile
    is 10-60 s on 2 cores): phase 1 the two-stage configs whose register estimate is plausible,
    phase 2 the three-stage variants of those that passed on both archs (stages change shared
    memory, barely registers). bf16 shares fp16's tiles and MMA shapes, so it uses the fp16 list.

    Writes kernel-static.json/.md and autotune.json (with `excluded`, see load_exclusions) into
    out_dir and returns their paths.
    """
    start = time.perf_counter()
    results: list[StaticResult] = []
    skipped: list[dict[str, object]] = []
    for d in SD_HEAD_DIMS:
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
    sweep_result: dict[str, object] = {
        "versions": versions(),
        "wall_s": round(time.perf_counter() - start, 1),
        "passing": {f"d{d}-{t}": names for (d, t), names in passing.items()},
        "results": [r.to_dict() for r in results],
        "skipped": skipped,
    }
    paths = [out_dir / "kernel-static.json", out_dir / "kernel-static.md", out_dir / "autotune.json"]
    write_json(paths[0], sweep_result)
    header = (
        "# Static compile check of the attention kernel (no GPU)\n\n"
        "`triton.compile` for each target, registers and spills from `ptxas -v` on the PTX, shared memory "
        "from the compiled metadata (benchmarks/kernel_static.py; `invedit bench kernel --static`). ok = no spills "
        "and shared memory within the per-block limit (sm_80 166912 B, sm_90a 232448 B). Configs not compiled "
        "(register estimate too high, or their two-stage variant failed) are listed in kernel-static.json.\n\n"
    )
    summary = "\n".join(f"- d={d} {t}: {', '.join(names) or 'none'}" for (d, t), names in passing.items())
    write_bytes(paths[1], (header + "Passing on both archs:\n\n" + summary + "\n\n" + markdown_table(results)).encode())
    write_json(paths[2], make_autotune_record(sweep_result, excluded))
    return paths
