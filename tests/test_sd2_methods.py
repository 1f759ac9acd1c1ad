"""Every editing method on SD-2: it runs on the tiny random SD-2 model and edits the target, and
its layer rules pick the same layers on SD-2.x's UNet as on SD-1.4's, at 768 px as at 512.

- Runs: each method (p2p, p2p-replace, masactrl, pnp, none, and ProxEdit's proximal guidance),
  paired with one of the inversions (null-text, negative-prompt, DirectInversion, DDIM), edits on
  `tiny-random-sd2` (v-prediction) at 128 px, 6 steps. Oracle: the same run with the method's edit
  switched off, and the source branch.
- Layers: the controllers of each method's plan, driven through the controller contract over
  every site of the full-size SD-1.4 and SD-2.x UNets (built on the meta device, no weights), edit
  the same set of sites, and that set is the one the references name (MasaCtrl's blocks 10-15,
  PnP's `up_blocks[1].resnets[1]` and decoder self-attention but its first block, P2P's
  self-attention at <= 32x32 at 512 px). The rules read no token count, so the dry run feeds a few
  tokens per site; what does depend on the image size, LocalBlend's mask, is checked at 768 px
  against an analytic map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.api import edit, plan_edit
from evaluation.registry import Registry
from control.local_blend import LocalBlend
from ldm.config import SD14, SD20_BASE, SD20_V, SD21_V, SDConfig
from ldm.context import AttnContext, RunInfo
from ldm.model import ModelFacts, StableDiffusion, open_model
from ldm.tokenizer import Tokenizer
from tests.test_stylediffusion import clip_dir  # noqa: F401 (a fixture: a tiny CLIP ViT as wide as the context)

REGISTRY = Registry()
SRC = "a round cake with orange frosting on a wooden plate"
TGT = "a square cake with orange frosting on a wooden plate"
STEPS = 6


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return open_model("tiny-random-sd2")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)


# the method's edit switched off, everything else (rows, prompts, inversion) the same
IDLE = {"p2p": {"cross": 0.0, "self_": 0.0}, "p2p-replace": {"cross": 0.0, "self_": 0.0},
        "masactrl": {"start_step": STEPS}, "pnp": {"features": 0.0, "attention": 0.0},
        "proximal-guidance": {"prox": None}}
# sites edited on the tiny UNet (11 transformer blocks, 6 of them in the decoder), as on tiny-random
SITES = {"p2p": 22, "p2p-replace": 22, "masactrl": 1, "pnp": 5 + 1, "proximal-guidance": 22, "none": 0}


@pytest.mark.parametrize("method,inversion", [
    ("p2p", "null-text"), ("p2p-replace", "direct"), ("masactrl", "ddim"), ("pnp", "direct"),
    ("none", "negative-prompt"), ("proximal-guidance", "direct"),
])
def test_every_method_edits_the_target_on_the_tiny_sd2_model(sd, image, method, inversion):
    """The idle run reuses the inversion (invert once, edit many times); null-text optimises two
    rounds per step, which is all its running on a v model needs to show."""
    extra = {"inner_steps": 2} if inversion == "null-text" else {}
    spec = REGISTRY.edit_spec(inversion=inversion, method=method, source=SRC, target=TGT, steps=STEPS, **extra)
    result = edit(sd, image, spec)
    out = result.latents
    assert torch.isfinite(out).all() and np.isfinite(result.edited).all()
    assert len(result.sites) == SITES[method]
    # the target is not the source (for "none", the prompt change alone must show)
    assert float((out[1] - out[0]).norm() / out[0].norm()) > 1e-2
    if inversion == "direct":
        torch.testing.assert_close(out[0], result.z0[0], rtol=0, atol=1e-5)  # the source reconstructs
    if method in IDLE:
        idle_spec = REGISTRY.edit_spec(inversion=inversion, method=method, source=SRC, target=TGT, steps=STEPS,
                                       allow_idle=True, **extra, **IDLE[method])
        idle = edit(sd, image, idle_spec, inversion=result.inversion).latents
        assert torch.equal(out[0], idle[0])  # the source branch is never edited
        assert float((out[1] - idle[1]).norm() / idle[1].norm()) > 1e-3, "the method changed nothing"


def dry_run(facts: ModelFacts, method: str, latent_hw: tuple[int, int], **settings) -> set[tuple[str, int, str]]:
    """Drive a plan's controllers over every site for every step, with a few random tokens per
    site (the rules read sites and steps, never token counts); the sites they edited."""
    spec = REGISTRY.edit_spec(method=method, source=SRC, target=TGT, steps=STEPS, **settings)
    plan = plan_edit(facts, spec)
    layout, g = plan.layout, torch.Generator().manual_seed(0)
    run = RunInfo(layout=layout, num_steps=STEPS, device=torch.device("cpu"), latent_hw=latent_hw)
    for c in plan.controllers:
        c.start(run)
    for step in range(STEPS):
        ctx = AttnContext(step=step, timestep=1, num_steps=STEPS, layout=layout, controllers=plan.controllers)
        for c in plan.controllers:
            c.begin_step(ctx)
        for site in facts.attn_sites:
            keys = 77 if site.kind == "cross" else 4
            q = torch.randn(len(layout), site.heads, 4, site.head_dim, generator=g)
            k, v = (torch.randn(len(layout), site.heads, keys, site.head_dim, generator=g) for _ in range(2))
            ctx.attend(q, k, v, site)
        for res in facts.res_sites:
            ctx.features(torch.randn(len(layout), 2, 2, 2, generator=g), res)
    return set().union(*(c.touched for c in plan.controllers))


def facts_of(config: SDConfig) -> ModelFacts:
    return ModelFacts.of(config, Tokenizer.bundled(config.text.pad_token))


@pytest.fixture(scope="module")
def full_size() -> dict[str, ModelFacts]:
    return {"sd14": facts_of(SD14), "sd20-base": facts_of(SD20_BASE), "sd20-v": facts_of(SD20_V),
            "sd21-v": facts_of(SD21_V)}


def test_sd2_unets_have_sd14s_sites_with_other_head_shapes(full_size):
    """Same blocks, levels and module names: only heads and head dims differ (8 x 40/80/160 vs 64-wide)."""
    def layout_of(facts):
        return ([(s.index, s.place, s.level, s.kind, s.name) for s in facts.attn_sites],
                [(s.index, s.place, s.level, s.block, s.name) for s in facts.res_sites])

    sd14 = layout_of(full_size["sd14"])
    for name in ("sd20-base", "sd20-v", "sd21-v"):
        assert layout_of(full_size[name]) == sd14, name
    assert {s.head_dim for s in full_size["sd21-v"].attn_sites} == {64}
    assert {s.head_dim for s in full_size["sd14"].attn_sites} == {40, 80, 160}


# what the references name, in SD-1.4's terms (512 px: level 0 is 64x64, 1 is 32x32, 2 is 16x16)
MASACTRL = {("self", i) for i in range(10, 16)}  # layer 10 on: the decoder's 32x32 and 64x64 blocks
PNP = {("self", i) for i in range(8, 16)} | {("res", 14)}  # decoder self-attention but block 7; up_blocks[1].resnets[1]
P2P_SELF = {("self", i) for i in range(2, 13)}  # <= 32x32: levels 1, 2 and the middle
P2P_CROSS = {("cross", i) for i in range(16)}


@pytest.mark.parametrize("method,settings,expected", [
    ("masactrl", {}, MASACTRL),
    ("pnp", {}, PNP),
    ("p2p", {"blend": ("cake", "cake")}, P2P_SELF | P2P_CROSS),
    ("p2p-replace", {}, P2P_SELF | P2P_CROSS),
])
def test_each_method_edits_the_same_layers_on_sd14_and_sd2_at_512_and_768(full_size, method, settings, expected):
    touched = {name: dry_run(facts, method, (96, 96) if name.endswith("-v") else (64, 64), **settings)
               for name, facts in full_size.items()}
    assert {(kind, index) for kind, index, _ in touched["sd14"]} == expected
    for name in ("sd20-base", "sd20-v", "sd21-v"):
        assert touched[name] == touched["sd14"], name
    res = [name for kind, _, name in touched["sd14"] if kind == "res"]
    assert res in ([], ["output_blocks.4.0"])  # diffusers' up_blocks[1].resnets[1]


def test_local_blend_reads_the_24x24_maps_of_a_768_px_image():
    """At 768 px (96x96 latents) LocalBlend's level 2 is 24x24 (16x16 at 512 px). Analytic case: the
    blend word attends to one 24x24 cell only; the mask is that cell dilated by the 3x3 max-pool
    (3x3 cells), upsampled 4x to the latent."""
    cols = torch.zeros(77)
    cols[2] = 1.0
    blend = LocalBlend(cols, cols, start_step=0, threshold=0.3, level=2)
    site = next(s for s in facts_of(SD21_V).attn_sites if blend.wants(s))
    assert (site.level, site.heads, site.head_dim) == (2, 20, 64)
    maps = torch.full((site.heads, 24 * 24, 77), 1 / 77)
    cell = 10 * 24 + 5  # row 10, column 5
    maps[:, cell, 2] = 1.0
    blend.store(site, maps, maps)
    mask = blend.mask((96, 96))
    assert mask.shape == (2, 1, 96, 96)
    expected = torch.zeros(96, 96, dtype=torch.bool)
    expected[9 * 4 : 12 * 4, 4 * 4 : 7 * 4] = True
    assert torch.equal(mask[1, 0], expected) and torch.equal(mask[0, 0], expected)


# the inversions and editing methods that read the UNet in other ways than the loop's DDIM step:
# SPDInv's fixed point (gradients into the latent), edit-friendly's noise maps and late start,
# EDICT's coupled pair in float64, pix2pix-zero's shifted inversion grid and its cross-attention
# guidance, StyleDiffusion's trained value input; each with few rounds, as its own tests do
LATER = [
    ("spdinv+p2p", {"rounds": 2}),
    ("spdinv+masactrl", {"rounds": 2, "start_step": 1}),
    ("edit-friendly-inversion+p2p", {"skip": 2}),
    ("edict+direct_forward", {}),
    ("pix2pix-zero-inversion+pix2pix-zero", {}),
    ("stylediffusion+p2p", {"inner_steps": 2}),
]


@pytest.mark.parametrize("method,settings", LATER, ids=[m for m, _ in LATER])
def test_the_gradient_noise_and_coupled_methods_edit_on_the_tiny_sd2_model(sd, image, clip_dir, method, settings):
    """v-prediction reaches every one of them through predict_noise: the run is finite, the target
    moves away from the source branch."""
    if method.startswith("stylediffusion"):
        settings = {**settings, "clip_vision": str(clip_dir)}
    spec = REGISTRY.edit_spec(method, source=SRC, target=TGT, steps=STEPS, **settings)
    result = edit(sd, image, spec)
    out = result.latents
    assert torch.isfinite(out).all() and np.isfinite(result.edited).all()
    assert float((out[-1] - out[0]).norm() / out[0].norm()) > 1e-2
