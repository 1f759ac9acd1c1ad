"""Peak memory of one SPDInv inversion step at full width: SD-1.4's UNet with random weights, fp32,
on the CPU, at 512 x 512 (latent 64 x 64): the plain DDIM step, then one AdamW round (a UNet forward
and backward into the latent at batch 1, weights frozen), with or without gradient checkpointing.
Run each in its own process (`--checkpoint off`, then `on`): the allocator keeps what the first run
freed, which hides the second one's peak in the same process.

Resident memory is sampled from /proc/self/statm every 20 ms (Linux). The figures for this repository
are in docs/methods/spdinv.md.

    python benchmarks/spdinv_memory.py [--size 512] [--checkpoint off|on|both]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from inversion.spdinv import SPDInvSettings, fixed_point_step
from ldm.config import SD14
from ldm.model import StableDiffusion
from samplers.noise import frozen_weights
from samplers.schedule import Schedule

PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = 1024**3


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """The highest resident set size seen while the block runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> "PeakSampler":
        self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--checkpoint", choices=("both", "on", "off"), default="off")
    args = parser.parse_args()
    torch.manual_seed(0)
    sd = StableDiffusion.tiny_random(config=SD14)
    latent = args.size // 8
    z0 = torch.randn(1, 4, latent, latent)
    prompt = torch.randn(1, 77, SD14.unet.context_dim)
    schedule = Schedule(50)
    k, t = 25, tuple(reversed(schedule.timesteps))[25]
    results = {"model_gib": round(rss() / GIB, 3), "size": args.size}
    for ckpt in {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpoint]:
        settings = SPDInvSettings(rounds=1, threshold=0.0, checkpoint=ckpt)
        base = rss()
        started = time.perf_counter()
        with PeakSampler() as peak, frozen_weights(sd):
            _, losses = fixed_point_step(sd, z0, k, t, prompt, schedule, settings)
        name = "checkpoint" if ckpt else "plain"
        results[name] = {"before_gib": round(base / GIB, 3), "peak_gib": round(peak.peak / GIB, 3),
                         "above_before_gib": round((peak.peak - base) / GIB, 3),
                         "seconds": round(time.perf_counter() - started, 1), "rounds": len(losses)}
        print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
