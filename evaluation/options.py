"""Command-line options every run command shares (steps, guidance, size, dtype, device, output),
and their validation into one-line UsageErrors before any weight is loaded."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.errors import UsageError
from ldm.image import parse_size
from ldm.model import DTYPES


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", default="512", help="N or WIDTHxHEIGHT, multiples of 64 (default 512)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the model's stored dtype)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--save-latents", action="store_true", help="also write the latents and the inversion trajectory (.npy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass(frozen=True)
class RunOptions:
    output: Path
    size: tuple[int, int]  # (width, height) in pixels
    dtype: torch.dtype | None


def check_run_options(args: argparse.Namespace) -> RunOptions:
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory")
    if not 1 <= args.steps <= 1000:
        raise UsageError(f"--steps {args.steps}: expected 1..1000")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {args.dtype!r}; choose from {', '.join(DTYPES)}")
    return RunOptions(output, parse_size(args.size), DTYPES[args.dtype] if args.dtype else None)
