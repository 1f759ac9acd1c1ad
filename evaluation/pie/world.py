"""The processes of one benchmark run: one alone, or the ranks torchrun started (torch.distributed).

PIE-Bench x methods is embarrassingly parallel, so scaling out needs no scheduler of ours: the
user starts `torchrun --nproc-per-node N --no-python invedit eval run ...` (on one or several
nodes, torchrun's own options), every rank reads the same benchmark, takes items r, r+W, r+2W, ...
(`shard`), writes its own outputs, and at the end `gather` brings every rank's records to rank 0,
which writes the one index. Backends: nccl when the run is on CUDA, each rank on the GPU of its
local rank (cuda:LOCAL_RANK), gloo on the CPU. Outside torchrun nothing is initialised.

The final gather waits for the slowest rank: the process group's timeout (`timeout`) must exceed
the difference between the ranks' running times, so it is generous by default.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from evaluation.commands.common import check_device
from ldm.errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun (or another torchelastic launcher)."""
    return dist.is_available() and dist.is_torchelastic_launched()


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device a rank runs on: `--device cuda` means the GPU of its local rank."""
    device = check_device(name)
    if device.type != "cuda":
        return device
    if device.index not in (None, local_rank):
        raise UsageError(f"--device {name}: under torchrun each rank uses cuda:LOCAL_RANK; give --device cuda")
    return check_device(f"cuda:{local_rank}")


@contextmanager
def world(device_name: str, timeout: timedelta) -> Iterator[tuple[World, torch.device]]:
    """(World, device) for the duration of the run; the process group is set up and torn down here."""
    if not launched():
        yield World(), check_device(device_name)
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    device = rank_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the object collectives of nccl use the current device
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    try:
        yield World(dist.get_rank(), dist.get_world_size(), local_rank, backend), device
    finally:
        dist.destroy_process_group()


def shard(items: Sequence[T], w: World) -> list[T]:
    """This rank's share: items r, r+W, r+2W, ... (every item on exactly one rank)."""
    return list(items[w.rank :: w.size])


def broadcast(value: Any, w: World) -> Any:
    """Rank 0's `value` on every rank (picklable)."""
    if w.backend is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, w: World) -> list[Any] | None:
    """On rank 0 the list of every rank's `value` in rank order; None on the other ranks."""
    if w.backend is None:
        return [value]
    out: list[Any] | None = [None] * w.size if w.leader else None
    dist.gather_object(value, out, dst=0)
    return out
