"""What a run writes, shared by `invedit reconstruct` and `invedit edit` (DESIGN.md §1, §9).

- `grid(images, captions)`: images side by side, each with its caption wrapped underneath.
- `StageTimer`: wall-clock time per named stage, for run.json.
- `run_record(command, params, timings, metrics, ...)` / `write_run_json`: run.json with every
  parameter, the software versions and the timings.
- `save_npy`: a tensor or array as float32 .npy; `save_png` (from ldm/image.py) for images.
- `image_mse_psnr`: pixel MSE and PSNR of two uint8 images (the reconstruction figure).
Every file is written atomically (ldm/files.py): a killed run leaves either nothing or whole files.
"""

from __future__ import annotations

import os
import platform
import sys
import textwrap
import time
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.files import atomic_path, write_json
from ldm.image import save_png

__all__ = ["StageTimer", "grid", "image_mse_psnr", "run_record", "save_npy", "save_png", "versions", "write_run_json"]

CAPTION_LINE = 14  # pixel height of one caption line with PIL's default bitmap font
PAD = 4


def grid(images: Sequence[np.ndarray], captions: Sequence[str] | None = None, *, pad: int = PAD) -> np.ndarray:
    """Place (H, W, 3) uint8 images in one row on white, each caption wrapped below its image.

    Images of different heights are top-aligned; captions start under the tallest one.
    Returns (H', W', 3) uint8.
    """
    if not images:
        raise ValueError("grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    font = ImageFont.load_default()
    widths = [im.shape[1] for im in images]
    chars = [max(8, w // 7) for w in widths]  # the default font is about 6-7 px per character
    wrapped = [textwrap.wrap(c, n) if c else [] for c, n in zip(captions or [""] * len(images), chars)]
    text_h = max((len(lines) for lines in wrapped), default=0) * CAPTION_LINE
    top = max(im.shape[0] for im in images)
    height = top + (text_h + pad if text_h else 0)
    width = sum(widths) + pad * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, lines in zip(images, wrapped):
        canvas.paste(Image.fromarray(np.asarray(im, dtype=np.uint8)), (x, 0))
        y = top + pad  # captions share one baseline under the tallest image
        for line in lines:
            draw.text((x + 2, y), line, fill="black", font=font)
            y += CAPTION_LINE
        x += im.shape[1] + pad
    return np.asarray(canvas)


def image_mse_psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """MSE over uint8 pixel values (0..255) and PSNR in dB (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    return mse, psnr


def save_npy(path: str | os.PathLike[str], value: torch.Tensor | np.ndarray | Sequence[torch.Tensor]) -> None:
    """Write a tensor, array or list of equal-shape tensors (stacked) as float32 .npy, atomically."""
    if isinstance(value, (list, tuple)):
        value = torch.stack([torch.as_tensor(v) for v in value])
    arr = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


class StageTimer:
    """Accumulates wall-clock seconds per named stage: `with timer("invert"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 4) for k, v in self.seconds.items()}, "total": round(sum(self.seconds.values()), 4)}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Versions of Python, the runtime packages and the device, for run.json."""
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "invedit": _version("invedit"),
        "torch": torch.__version__,
    }
    for pkg in ("numpy", "pillow", "safetensors", "transformers", "triton"):
        out[pkg] = _version(pkg)
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)  # JSON has no inf/nan
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (np.generic,)):
        return _jsonable(value.item())
    return str(value)


def run_record(
    command: str,
    params: Mapping[str, Any],
    timings: Mapping[str, float],
    metrics: Mapping[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The content of run.json: command, every parameter, metrics, timings, versions, extra sections."""
    record = {
        "command": command,
        "params": dict(params),
        "metrics": dict(metrics or {}),
        "timings_s": dict(timings),
        **sections,
        "versions": versions(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return _jsonable(record)


def write_run_json(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    write_json(path, _jsonable(record))
