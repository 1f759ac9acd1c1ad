"""`invedit info`: load or build a model, print its size and attention sites, time one UNet call."""

from __future__ import annotations

import argparse
import time

import torch

from evaluation.registry import Registry
from ldm.model import COMPONENTS, DTYPES, TINY_MODELS, open_model

DESCRIPTION = "Load a model (or build tiny-random), print its parameter counts and attention sites, run one UNet call."


def add_arguments(p: argparse.ArgumentParser, registry: Registry) -> None:
    p.description = DESCRIPTION
    p.add_argument("--model", default="tiny-random",
                   help=f"converted model directory or one of {', '.join(TINY_MODELS)} (default: tiny-random)")
    p.add_argument("--size", type=int, default=512, help="image size in pixels for the test forward (default: 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default: as stored)")


def run(args: argparse.Namespace, registry: Registry) -> int:
    sd = open_model(args.model, DTYPES.get(args.dtype))
    for name in COMPONENTS:
        n = sum(p.numel() for p in getattr(sd, name).parameters())
        print(f"{name:5s} {n:>13,d} parameters")
    print(f"{'index':>5} {'place':5} {'level':>5} {'kind':5} {'heads':>5} {'dim':>4}  module")
    for s in sd.unet.attn_sites():
        print(f"{s.index:>5} {s.place:5} {s.level:>5} {s.kind:5} {s.heads:>5} {s.head_dim:>4}  {s.name}")
    side = args.size // sd.config.vae.downsample_factor
    z = torch.randn(1, sd.config.unet.in_channels, side, side, generator=torch.Generator().manual_seed(0), dtype=sd.dtype)
    start = time.perf_counter()
    with torch.no_grad():
        eps = sd.unet(z, 981, sd.embed(["a photo of a cat"]))
    print(f"UNet forward at {args.size}x{args.size}: output {tuple(eps.shape)}, std {eps.float().std():.3f}, "
          f"{time.perf_counter() - start:.2f} s")
    return 0
