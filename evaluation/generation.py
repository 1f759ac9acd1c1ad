"""Text to image: deterministic DDIM (eta 0) from seeded noise, on the grid the editing code uses.

    latents = start_noise(seed=1234, count=2, size=(512, 512))        # (2, 4, 64, 64)
    result = generate(sd, "a cat on a sofa", latents, negative="blurry")

Each image is denoised by the one editing loop (samplers/loop.py) over the rows [uncond, cond]:
the negative prompt's embedding (default "") on the uncond row, the prompt's on the cond row,
classifier-free guidance, the grid 981, 961, ..., 1 at 50 steps (samplers/schedule.py). The start
noise is drawn as diffusers' StableDiffusionPipeline draws it from a CPU generator (one
(count, 4, h, w) standard normal tensor; DDIM's initial sigma is 1), so the same seed gives the
same start latents there. A generated image can then be edited, or serve as a Plug-and-Play source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from control.words import token_ids
from evaluation.images import decode
from evaluation.timing import StageTimer
from ldm.context import BatchLayout, Row
from ldm.model import StableDiffusion
from samplers.loop import denoise
from samplers.schedule import Schedule


def start_noise(seed: int, count: int, size: tuple[int, int], channels: int = 4, factor: int = 8) -> Tensor:
    """(count, channels, H/factor, W/factor) float32 standard normal from a CPU generator seeded
    `seed`; size is (width, height) in pixels."""
    width, height = size
    return torch.randn(count, channels, height // factor, width // factor, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Generated:
    """latents: (count, 4, h, w) final latents; images: (count, H, W, 3) uint8 decodes."""

    latents: Tensor
    images: np.ndarray
    unet_rows: int
    timings: Mapping[str, float]


def generate(sd: StableDiffusion, prompt: str, z_T: Tensor, *, negative: str = "", steps: int = 50,
             guidance: float = 7.5, progress: bool = False, timer: StageTimer | None = None) -> Generated:
    """Denoise each start latent of z_T ((count, 4, h, w)) under `prompt`, one image at a time."""
    timer = timer or StageTimer()
    for text in (prompt, negative):
        token_ids(sd.tokenizer, text)  # refuses prompts over 75 tokens
    with timer("encode"):
        null, cond = sd.embed([negative, prompt]).split(1)
    layout = BatchLayout.cfg(("source",))
    texts = {Row("source", "uncond"): null, Row("source", "cond"): cond}
    schedule = Schedule(steps=steps)
    finals, rows = [], 0
    with timer("denoise"):
        for k in range(z_T.shape[0]):
            out = denoise(sd, layout, texts, z_T=z_T[k : k + 1].to(sd.device), guidance=guidance, schedule=schedule,
                          progress=progress, desc=f"image {k + 1}/{z_T.shape[0]}")
            finals.append(out.latents)
            rows += out.unet_rows
    latents = torch.cat(finals)
    with timer("decode"):
        images = decode(sd, latents)
    return Generated(latents, images, rows, timer.as_dict())
