"""What the run commands (edit, reconstruct, invert) share between parsing and computing: checked
run options, the model, the input image and the run.json sections describing them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.api import InversionSpec
from evaluation.images import DEFAULT_MAX_PIXELS, file_info, load_image, parse_size
from evaluation.memory import check_memory
from evaluation.options import build_settings, refuse_foreign_options
from evaluation.outputs import make_parent
from evaluation.registry import Registry
from ldm.errors import UsageError
from ldm.model import DTYPES, TINY_MODELS, StableDiffusion, default_dtype, open_model


@dataclass(frozen=True)
class RunOptions:
    size: tuple[int, int]  # (width, height) in pixels
    dtype: torch.dtype | None
    device: torch.device
    progress: bool
    max_pixels: int = DEFAULT_MAX_PIXELS  # largest input image read (--max-pixels)
    orient: bool = True  # apply the photo's EXIF orientation (--ignore-orientation: pixels as stored)


def check_device(name: str) -> torch.device:
    """A torch device this machine has, or a one-line error naming the ones it has."""
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; this machine has {', '.join(available)}") from None
    usable = (device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available()
              and (device.index or 0) < torch.cuda.device_count()) or (device.type == "mps" and "mps" in available))
    if not usable:
        raise UsageError(f"--device {name}: not available here; this machine has {', '.join(available)}")
    return device


def check_run_options(args: argparse.Namespace) -> RunOptions:
    """Everything checkable before a weight is loaded or an image is read."""
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise UsageError(f"--steps {args.steps}: expected 1..1000")
    if not np.isfinite(args.guidance):
        raise UsageError(f"--guidance {args.guidance}: expected a finite number")
    if args.max_pixels < 1:
        raise UsageError(f"--max-pixels {args.max_pixels}: expected a positive number of pixels")
    size, device = parse_size(args.size), check_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)  # bf16 on CPUs with bf16 units
    check_memory(size, dtype, device)
    return RunOptions(size, dtype, device, not args.no_progress, args.max_pixels, not args.ignore_orientation)


def load_model(args: argparse.Namespace, run: RunOptions) -> StableDiffusion:
    return open_model(args.model, run.dtype, run.device)


def read_image(path: str, run: RunOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """The photo, cropped and resized for the run, and what run.json records of the file."""
    image = load_image(path, run.size, run.max_pixels, run.orient)
    return image, {**file_info(path, run.max_pixels, run.orient), "used_size": list(run.size)}


def model_section(args: argparse.Namespace, sd: StableDiffusion) -> dict[str, Any]:
    return {"spec": args.model, "dtype": str(sd.dtype), "device": str(sd.device)}


def check_output_file(path: str, suffix: str) -> Path:
    """An output file path that can be written: not a folder, parent writable, given suffix."""
    p = Path(path)
    if p.suffix != suffix:
        raise UsageError(f"output {p}: expected a {suffix} file name")
    if p.is_dir():
        raise UsageError(f"output {p} is a directory; expected a {suffix} file name")
    make_parent(p)
    return p


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model and --image, as every run command takes them."""
    p.add_argument("--model", required=True, help="converted model directory (invedit convert), or a random-weight "
                   f"test model: {', '.join(TINY_MODELS)}")
    p.add_argument("--image", required=True, help="the photo (any format PIL reads)")


def inversion_spec_of(args: argparse.Namespace, registry: Registry) -> InversionSpec:
    """The InversionSpec of `--prompt`, `--inversion` and its options, and the run options."""
    choice = registry.inversion(args.inversion)
    refuse_foreign_options(args, registry, [choice.method.name])
    run_values = {"steps": args.steps or 50, "guidance": args.guidance, "seed": args.seed, **choice.run}
    return InversionSpec(args.prompt, choice.method, build_settings(args, choice), **run_values)
