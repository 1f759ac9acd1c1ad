"""Controllers never build a self-attention probability map (docs/architecture.md "The controller contract").

A narrow UNet with attention at a 64x64 latent level (4096 tokens, as SD-1.4's level 0 at 512 px)
and a 32x32 one (1024 tokens, where P2P's self replacement acts), every control window forced open
from step 0. Every tensor any aten op produces is seen by a TorchDispatchMode (an allocation hook
at the operator level: SDPA falling back to its math path would show up as an N x N bmm output).
We record the largest tensor produced inside each controller call per attention site, and over a
whole UNet step; one N x N map for one head of one row is the bar to stay far below.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from control.masactrl import MutualSelfAttention
from control.p2p import P2PSettings, make_p2p
from control.pnp import PlugAndPlay
from ldm.config import TINY, SDConfig, UNetConfig
from kernels.attention import fused_attention
from ldm.context import AttnContext, BatchLayout, Row, RunInfo
from ldm.model import StableDiffusion

LATENT = 64
SOURCE, TARGET = "a round cake on a plate", "a square cake on a plate"


class LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


class Watch:
    """Hands every call to `inner`, recording the largest tensor made per site while the layer's
    output is computed (by `inner`, or by the plain fused attention when `inner` passes)."""

    def __init__(self, inner) -> None:
        self.inner, self.per_site = inner, {}

    def start(self, run):
        self.inner.start(run)

    def attend(self, q, k, v, site, ctx):
        with LargestTensor() as probe:
            out = self.inner.attend(q, k, v, site, ctx)
            if out is None:
                out = fused_attention(q, k, v)
        key = (site.index, site.kind, q.shape[2])
        self.per_site[key] = max(self.per_site.get(key, 0), probe.numel)
        return out

    def features(self, h, site, ctx):
        return self.inner.features(h, site, ctx)

    def begin_step(self, ctx):
        self.inner.begin_step(ctx)

    def end_step(self, ctx, latents):
        return self.inner.end_step(ctx, latents)


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    unet = UNetConfig(block_out_channels=(16, 16), attention_levels=(True, True), num_heads=(2, 2),
                      layers_per_block=1, context_dim=32, norm_groups=8)
    return StableDiffusion.tiny_random(seed=0, config=SDConfig(unet=unet, vae=TINY.vae, text=TINY.text))


def controllers(sd):
    p2p = make_p2p(sd.tokenizer, SOURCE, TARGET, 10,
                   P2PSettings(cross=1.0, self_=1.0, blend=("cake", "cake"), blend_start=0.0, blend_level=1))
    masa = MutualSelfAttention(start_step=0, start_layer=0)
    pnp = PlugAndPlay(sd.unet.attn_sites(), sd.unet.res_sites(), 10, feature_frac=1.0, attn_frac=1.0)
    return {"p2p": (p2p, BatchLayout.cfg()), "masactrl": (masa, BatchLayout.cfg()),
            "pnp": (pnp, BatchLayout((Row("reference", "cond"), Row("target", "uncond"), Row("target", "cond"))))}


@pytest.mark.parametrize("name", ["p2p", "masactrl", "pnp"])
def test_no_self_attention_map_is_built(sd, name):
    controller, layout = controllers(sd)[name]
    watch = Watch(controller)
    x = torch.randn(len(layout), 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    context = torch.randn(len(layout), 77, 32, generator=torch.Generator().manual_seed(1))
    ctx = AttnContext(step=0, timestep=981, num_steps=10, layout=layout, controllers=(watch,))
    watch.start(RunInfo(layout, 10, x.device, (LATENT, LATENT)))
    with torch.no_grad(), LargestTensor() as whole:
        watch.begin_step(ctx)
        sd.unet(x, torch.tensor(981), context, ctx)
        watch.end_step(ctx, torch.randn(len(layout.roles) - (name == "pnp"), 4, LATENT, LATENT))
    tokens = {n for (_, kind, n) in watch.per_site if kind == "self"}
    assert tokens == {4096, 1024}  # level 0; level 1 and the middle block
    heads = sd.unet.attn_sites()[0].heads
    for (index, kind, n), numel in watch.per_site.items():
        if kind == "self":  # far below one N x N map of one head of one row
            assert numel <= n * n // 8, (name, index, kind, n, numel)
        else:  # cross maps (N x 77 per head and row) may be materialised, nothing bigger
            assert numel <= len(layout) * heads * n * 77, (name, index, kind, n, numel)
    assert whole.numel < 4096 * 4096 // 4, whole.numel
    print(f"\n{name}: largest tensor in a step {whole.numel:,} elements; inside attend at 4096 tokens "
          f"{max(v for (i, k, n), v in watch.per_site.items() if n == 4096):,}, at 1024 tokens "
          f"{max(v for (i, k, n), v in watch.per_site.items() if n == 1024):,}; sites edited {controller.sites_touched}")
    assert controller.sites_touched > 0
    if name == "p2p":  # self replacement active at 1024 tokens, not at 4096 (64x64 at 512 px)
        assert any(kind == "self" and idx in {s.index for s in sd.unet.attn_sites() if s.level == 1}
                   for kind, idx, _ in controller.touched)
        assert not any(kind == "self" and idx in {s.index for s in sd.unet.attn_sites() if s.level == 0}
                       for kind, idx, _ in controller.touched)
