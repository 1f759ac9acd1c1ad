"""Shared helpers of the benchmarks: timing by median, device and version naming, result files.

Conventions (docs/performance.md): warm-up runs first, then the median of the timed repeats; on
CUDA every measurement is synchronised and peak memory is read after a reset of the peak counter.
Result files are written atomically into the directory the user names (`--out`).
"""

from __future__ import annotations

import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ldm.files import write_bytes, write_json


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def slug(name: str) -> str:
    """A device name as a file-name part: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict[str, str]:
    """The software a result was measured with."""
    import triton  # not at module level: the UNet benchmark also runs where Triton is absent

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time in seconds of `fn` and, on CUDA, its peak allocated memory in bytes."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_bytes": peak, "repeats": repeats}


def write_results(directory: Path, stem: str, payload: dict, table: str) -> tuple[Path, Path]:
    """Write directory/stem.json and directory/stem.md, each atomically."""
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    write_json(json_path, payload)
    write_bytes(md_path, (table + "\n").encode())
    return json_path, md_path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
