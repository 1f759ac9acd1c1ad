"""Run the Triton attention kernel in Triton's CPU interpreter, in a child process.

Triton decides at decoration time (`@triton.jit`, when kernels/triton_attention.py is imported)
whether kernels are compiled or interpreted, from TRITON_INTERPRET. A process that has already
imported the kernel normally (any test session: ldm/ imports kernels/attention.py) cannot switch,
and setting the variable in-process would leak into everything imported later. So interpreted
runs happen in a fresh `python -m benchmarks.triton_interpret` with TRITON_INTERPRET=1: the parent
writes the inputs with torch.save, the child runs `fused_attention(..., backend="triton")` (or the
rows variant) on each and writes the outputs. Used by the kernel tests and by `invedit bench
kernel` on machines without a GPU.

The child runs in, and imports from, the directory that holds the `benchmarks` and `kernels`
packages: the checkout in a plain clone, site-packages in an installed copy. So it finds the same
code as its parent whatever the user's current directory holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# the directory holding the benchmarks/ and kernels/ packages (a checkout, or site-packages)
PACKAGES_ROOT = Path(__file__).resolve().parent.parent
CHILD_MODULE = "benchmarks.triton_interpret"


@dataclass(frozen=True)
class Job:
    """One attention call: rows = (q_rows, k_rows, v_rows) selects fused_attention_rows."""

    q: Tensor
    k: Tensor
    v: Tensor
    rows: tuple[list[int], list[int], list[int]] | None = None
    scale: float | None = None
    config: tuple[int, int] | None = None  # (BLOCK_M, BLOCK_N); None = the interpreter default
    grad_out: Tensor | None = None  # if given, also backpropagate it: the result is (out, dq, dk, dv)


def run_interpreted(jobs: list[Job], timeout_s: float = 600.0) -> list[Tensor | tuple[Tensor, ...]]:
    """Outputs of the Triton kernel under TRITON_INTERPRET=1 for each job, in order
    ((out, dq, dk, dv) for jobs with grad_out)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "jobs.pt", Path(tmp) / "out.pt"
        torch.save([_to_dict(j) for j in jobs], src)
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGES_ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.run(
            [sys.executable, "-m", CHILD_MODULE, str(src), str(dst)],
            env=env,
            cwd=PACKAGES_ROOT,  # `-m` puts the cwd first on sys.path
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"interpreted kernel run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return torch.load(dst, weights_only=True)


def _to_dict(job: Job) -> dict[str, object]:
    return {
        "q": job.q,
        "k": job.k,
        "v": job.v,
        "rows": job.rows,
        "scale": job.scale,
        "config": job.config,
        "grad_out": job.grad_out,
    }


def _child(src: Path, dst: Path) -> None:
    from kernels.attention import fused_attention, fused_attention_rows
    from kernels.triton_attention import INTERPRET_CONFIG, BlockConfig, interpreting, triton_attention

    if not interpreting():
        raise SystemExit(f"{CHILD_MODULE}: run me with TRITON_INTERPRET=1 (use run_interpreted)")
    outs = []
    for job in torch.load(src, weights_only=True):
        q, k, v, rows, scale = job["q"], job["k"], job["v"], job["rows"], job["scale"]
        grad_out = job["grad_out"]
        if grad_out is not None:
            q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        if job["config"] is not None:  # a block config other than the default: call the launcher
            m, n = job["config"]
            cfg = BlockConfig(m, n, INTERPRET_CONFIG.num_warps, INTERPRET_CONFIG.num_stages)
            index = None if rows is None else tuple(torch.tensor(r, dtype=torch.int32) for r in rows)
            outs.append(triton_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, index, cfg))
        elif rows is None:
            outs.append(fused_attention(q, k, v, scale=scale, backend="triton"))
        else:
            outs.append(fused_attention_rows(q, k, v, *rows, scale=scale, backend="triton"))
        if grad_out is not None:
            outs[-1].backward(grad_out)
            outs[-1] = (outs[-1].detach(), q.grad, k.grad, v.grad)
    torch.save(outs, dst)


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
