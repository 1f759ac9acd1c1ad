"""Will an edit at this image size fit in memory? Checked before any weight is loaded.

A run's activations grow with the image's pixels: at 512 x 512 px in float32 the peak (the VAE
decode of both branches) is about 3 GiB above the weights (docs/methods/pix2pix-zero.md,
"Memory": 8.0 GiB peak with 4.97 GiB of weights). `activation_bytes` scales that measurement with
the pixel count and the dtype's width; `check_memory` refuses a size whose activations alone
exceed the memory the device has free, with both numbers, instead of a kill by the kernel (or a
CUDA out-of-memory traceback) minutes later. The estimate is a lower bound of a whole run, so it
refuses only what cannot fit.
"""

from __future__ import annotations

import os

import torch

from ldm.errors import UsageError

GIB = 1024**3
BYTES_PER_PIXEL_FP32 = 3 * GIB / (512 * 512)  # measured peak above the weights at 512 px, float32


def activation_bytes(size: tuple[int, int], dtype: torch.dtype | None) -> int:
    """Estimated peak activation memory of an edit at size = (width, height); dtype None: float32."""
    width = torch.empty((), dtype=dtype or torch.float32).element_size()
    return int(size[0] * size[1] * BYTES_PER_PIXEL_FP32 * width / 4)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the device: CUDA's free memory, the system's available memory for the CPU
    (Linux /proc/meminfo, else sysconf); None when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(size: tuple[int, int], dtype: torch.dtype | None, device: torch.device) -> None:
    """Refuse a --size whose estimated activations exceed the device's free memory."""
    need = activation_bytes(size, dtype)
    free = available_bytes(device)
    if free is not None and need > free:
        raise UsageError(
            f"--size {size[0]}x{size[1]}: an edit needs about {need / GIB:.1f} GiB for its activations alone, "
            f"more than the {free / GIB:.1f} GiB free on {device}; use a smaller --size"
        )
