"""pix2pix-zero (Parmar et al., "Zero-shot Image-to-Image Translation", SIGGRAPH 2023) as PIE-Bench
runs it (cure-lab/PnPInversion `run_editing_pix2pix_zero.py`; docs/methods/pix2pix-zero.md).

The photo is described by a caption c (`--caption`, by default the source prompt; or BLIP's,
`--captioner`), inverted under it (the reference's names use pix2pix-zero's own regularised
inversion, inversion/pix2pix_zero.py; plain DDIM and DirectInversion work too), and denoised twice
from z_T at the edit's guidance:
1. the reconstruction, rows [c, c] (the caption is also the negative prompt): `prepare` runs it
   and keeps its latent r_i at every step. From an inversion that pins the source (the reference's
   directinversion+pix2pix-zero, `Inversion.exact_source`) r_i is pinned onto the inversion
   trajectory after each step and the pinning offsets D_i = L[-2-i] - step(r_i) are recorded;
2. the edit, rows [c, c + Δ] (control/cross_guidance.py): Δ the difference of the mean text
   embeddings of the target and source sentences (by default the two prompts; `--source-sentences`
   / `--target-sentences` read one sentence per line), and before each UNet call a gradient step of
   size λ on the latent toward the reconstruction's cross-attention maps of the same step. From a
   DirectInversion the edit's latent also gets D_i after each step, as the reference adds them.

Layout: the edited branch is the "target" role, [target/uncond, target/cond]; the reconstruction is
the source the editing API reports (the prepared inversion's z0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from control.caption import Captioner
from control.cross_guidance import CrossAttentionGuidance, EditDirection
from control.method import EditMethod, EditPlan, EditPrompts, Pair, Sampling
from control.words import normalize, token_ids
from ldm.context import BatchLayout, Row, RunInfo
from ldm.errors import UsageError
from ldm.model import ModelFacts, StableDiffusion
from samplers.guidance import ClassifierFree
from samplers.inversion import Correction, Inversion, InversionCost
from samplers.loop import StepState, denoise
from samplers.settings import Alias, Settings, setting


@dataclass(frozen=True)
class Pix2PixZeroSettings(Settings):
    """The reference's run: cross-attention guidance 0.1, the caption as prompt and negative prompt."""

    xa_guidance: float = setting(0.1, "cross-attention guidance: the step size of the gradient step on the latent toward "
                                 "the reconstruction's maps (lambda; 0 = the plain edit of the direction)", low=0.0)
    caption: str | None = setting(None, "the prompt the photo is inverted and reconstructed with (none: --source, or "
                                  "BLIP's caption with --captioner)", metavar="TEXT")
    captioner: str | None = setting(None, "caption the photo with BLIP from this transformers folder or hub id in the "
                                    "cache (the reference uses Salesforce's BLIP base, COCO captions)", metavar="FOLDER")
    source_sentences: str | None = setting(None, "file of sentences, one a line, whose mean embedding is the direction's "
                                           "start (none: --source)", metavar="FILE")
    target_sentences: str | None = setting(None, "file of sentences, one a line, whose mean embedding is the direction's "
                                           "end (none: --target)", metavar="FILE")
    xa_checkpoint: bool = setting(False, "gradient checkpointing of the UNet in the guidance's backward passes (about "
                                  "two thirds less activation memory, one more forward pass)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.caption is not None and self.captioner is not None:
            raise UsageError("give --caption or --captioner, not both")


def read_sentences(path: str, flag: str) -> tuple[str, ...]:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not a UTF-8 text file") from None
    sentences = tuple(normalize(line) for line in lines if line.strip())
    if not sentences:
        raise UsageError(f"{flag} {path}: no sentence in it (one a line)")
    return sentences


def resolve_caption(settings: Pix2PixZeroSettings, photo: np.ndarray) -> Pix2PixZeroSettings:
    """With --captioner, the caption BLIP gives the photo, as if it had been given with --caption
    (so the edit records it, and a second edit of the same inversion reads the same prompt)."""
    if settings.captioner is None:
        return settings
    caption = Captioner.load(settings.captioner)(photo)
    return replace(settings, caption=caption, captioner=None)


class _Reconstruction:
    """Step hook of the reconstruction pass: keeps r_i, the latent each step starts from; with `pin`,
    first moves it onto the inversion latent of the step (r_i = z + (L - z), the reference's
    arithmetic) and keeps the offset."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.latents: list[Tensor] = []
        self.offsets: list[Tensor] = []

    def start(self, run: RunInfo) -> None:
        self.latents, self.offsets = [], []

    def before_unet(self, sd: StableDiffusion, state: StepState) -> StepState:
        z = state.latents
        if self.pin and state.step > 0:
            assert state.pivot is not None
            d = state.pivot - z
            self.offsets.append(d)
            z = z + d
        self.latents.append(z.detach().clone())
        return replace(state, latents=z)


def reconstruction(sd: StableDiffusion, inversion: Inversion, caption: Tensor, guidance: float, progress: bool) -> Inversion:
    """The reconstruction as an inversion the edit reads: pivot(i) = r_i, z0 = the final r; from an
    inversion that pins the source (DirectInversion), r_i pinned onto its trajectory and the offsets
    as a correction of the target."""
    pin = inversion.exact_source
    record = _Reconstruction(pin)
    out = denoise(sd, BatchLayout.cfg(("source",)), torch.cat([caption, caption]),
                  inversion=replace(inversion, corrections=None), hooks=(record,), guidance=guidance, progress=progress,
                  desc="pix2pix-zero reconstruction")
    final = out.latents
    if pin:
        d = inversion.z0.to(final) - final
        record.offsets.append(d)
        final = final + d
    trajectory = (final, *reversed(record.latents))  # r_T .. r_0: pivot(i) = r_i
    corrections = Correction("offset", tuple(record.offsets), role="target") if pin else None
    cost = inversion.cost + InversionCost(unet_rows=out.unet_rows)
    return Inversion(inversion.method, trajectory, corrections=corrections, settings=inversion.settings, cost=cost)


def plan_pix2pix_zero(facts: ModelFacts, prompts: EditPrompts, settings: Pix2PixZeroSettings, sampling: Sampling) -> EditPlan:
    caption = normalize(settings.caption) if settings.caption is not None else prompts.source
    sides = []
    for path, flag, prompt in ((settings.source_sentences, "--source-sentences", prompts.source),
                               (settings.target_sentences, "--target-sentences", prompts.target)):
        sentences = read_sentences(path, flag) if path is not None else (prompt,)
        for s in sentences:
            token_ids(facts.tokenizer, s)  # refuses sentences over 75 tokens, as prompts
        sides.append(sentences)
    hooks = (EditDirection(sides[0], sides[1]), CrossAttentionGuidance(settings.xa_guidance, checkpoint=settings.xa_checkpoint))

    def prepare(sd: StableDiffusion, inversion: Inversion, embeddings: Mapping[str, Tensor], progress: bool) -> Inversion:
        return reconstruction(sd, inversion, embeddings[caption], sampling.guidance, progress)

    texts = {Row("target", "uncond"): caption, Row("target", "cond"): caption}
    return EditPlan(BatchLayout.cfg(("target",)), texts, caption, ClassifierFree(sampling.guidance), hooks=hooks,
                    prepare=prepare)


METHOD = EditMethod(
    name="pix2pix-zero",
    summary="pix2pix-zero: the caption's embedding moved by the sentence direction, cross-attention guidance toward "
            "the reconstruction's maps (lambda 0.1)",
    settings=Pix2PixZeroSettings,
    plan=plan_pix2pix_zero,
    aliases=(Alias("pix2pixzero"),),
    inversions=("pix2pix-zero-inversion", "ddim", "direct"),
    pairs=(Pair("ddim+pix2pix-zero", "pix2pix-zero-inversion"),
           Pair("directinversion+pix2pix-zero", "pix2pix-zero-inversion", {"direct": True})),
    resolve=resolve_caption,
)
