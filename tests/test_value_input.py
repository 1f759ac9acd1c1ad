"""The network contract's separate value input of cross-attention (ldm.context.ValueInput) and
gradient checkpointing (AttnContext.checkpoint), and how the loop applies an inversion's value
modulation (samplers.inversion.ValueModulation, StyleDiffusion's learned values).

- no value input, or one that carries each row's own text, leaves the UNet bit for bit as it was;
- a value input reaches every cross-attention site it names and no other: swapping it at one site
  moves the output, and that site's own attention maps (keys from the text) stay exactly the same;
- V really is to_v(values): one cross-attention layer checked against softmax(QK^T)V written here;
- checkpointed backward passes give the gradients of the plain ones;
- the loop modulates exactly the cond rows of the roles and steps the modulation names.
"""

from __future__ import annotations

import pytest
import torch

from control.base import ControllerBase
from control.record import CallMaps
from ldm.config import TINY, SDConfig, UNetConfig
from ldm.context import AttnContext, BatchLayout, Row, ValueInput
from ldm.model import StableDiffusion
from samplers.inversion import Inversion, ValueModulation
from samplers.loop import denoise

# attention at both levels, 8x8 latents: a UNet call costs milliseconds
SMALL = SDConfig(
    unet=UNetConfig(block_out_channels=(32, 32), attention_levels=(True, True), num_heads=(2, 2), context_dim=32),
    vae=TINY.vae,
    text=TINY.text,
)
ONE = BatchLayout((Row("source", "cond"),))


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return StableDiffusion.tiny_random(seed=5, config=SMALL)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def call(sd, x, c, values=None, controllers=(), checkpoint=False):
    return sd.unet(x, 401, c, AttnContext(0, 401, 1, ONE, tuple(controllers), values=values, checkpoint=checkpoint))


def cross_blocks(sd) -> list[int]:
    return [s.index for s in sd.unet.attn_sites() if s.kind == "cross"]


def test_no_value_input_or_the_texts_own_leaves_the_unet_unchanged(sd) -> None:
    x, c = rand(1, 4, 8, 8, seed=0), rand(1, 77, 32, seed=1)
    with torch.no_grad():
        plain = sd.unet(x, 401, c)
        assert torch.equal(call(sd, x, c), plain)
        assert torch.equal(call(sd, x, c, ValueInput(c.clone())), plain)


def test_the_value_input_reaches_every_site_it_names_and_no_other(sd) -> None:
    x, c = rand(1, 4, 8, 8, seed=0), rand(1, 77, 32, seed=1)
    values = c + rand(1, 77, 32, seed=2)
    blocks = cross_blocks(sd)
    assert len(blocks) == 11  # 2 per down level, the middle block, 3 per up level
    with torch.no_grad():
        everywhere = call(sd, x, c, ValueInput(values))
        assert torch.equal(everywhere, call(sd, x, c, ValueInput(values, frozenset(blocks))))
        assert not torch.allclose(everywhere, sd.unet(x, 401, c))
        for b in blocks:  # swapping the values of one site back moves the output
            others = call(sd, x, c, ValueInput(values, frozenset(blocks) - {b}))
            assert not torch.allclose(others, everywhere, atol=1e-6), b
            # at the swapped site itself the maps are the text's: keys never read the value input
            plain_maps, swapped_maps = CallMaps(), CallMaps()
            call(sd, x, c, controllers=(plain_maps,))
            call(sd, x, c, ValueInput(values, frozenset({b})), controllers=(swapped_maps,))
            assert torch.equal(plain_maps.maps[b], swapped_maps.maps[b])
            later = [s for s in blocks if s > b]
            assert all(not torch.equal(plain_maps.maps[s], swapped_maps.maps[s]) for s in later)


def test_the_value_is_to_v_of_the_value_input(sd) -> None:
    """One cross-attention layer against softmax(Q K^T / sqrt(d)) V with V = to_v(values), here."""
    layer = next(m for m in sd.unet.modules() if getattr(m, "site", None) is not None
                 and type(m).__name__ == "Attention" and m.site.kind == "cross")
    x, c, values = rand(1, 16, layer.to_q.in_features, seed=3), rand(1, 77, 32, seed=4), rand(1, 77, 32, seed=5)
    ctx = AttnContext(0, 401, 1, ONE, (ControllerBase(),), values=ValueInput(values))
    with torch.no_grad():
        out = layer(x, c, ctx)
        h = layer.heads
        q, k, v = (p(s).reshape(1, -1, h, p.out_features // h).transpose(1, 2)
                   for p, s in ((layer.to_q, x), (layer.to_k, c), (layer.to_v, values)))
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        want = layer.to_out((attn @ v).transpose(1, 2).reshape(1, 16, -1))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_checkpointed_backward_gives_the_plain_gradients(sd) -> None:
    x, c = rand(1, 4, 8, 8, seed=0), rand(1, 77, 32, seed=1)
    grads = []
    for checkpoint in (False, True):
        z = x.clone().requires_grad_(True)
        values = (c + 0.1).requires_grad_(True)
        maps = CallMaps()
        out = call(sd, z, c, ValueInput(values), controllers=(maps,), checkpoint=checkpoint)
        loss = out.square().mean() + sum(m.square().sum() for m in maps.maps.values())
        grads.append(torch.autograd.grad(loss, (z, values)))
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in sd.parameters())


def test_the_loop_modulates_the_cond_rows_of_the_roles_and_steps_it_names(sd) -> None:
    steps = 3
    scale = tuple(1 + rand(1, 77, 32, seed=10 + i) for i in range(steps))
    shift = tuple(rand(1, 77, 32, seed=20 + i) for i in range(steps))
    layout = BatchLayout.cfg()
    context = rand(4, 77, 32, seed=6)
    for until, rows_by_step in (
        (None, [[2, 3]] * 3),  # every cond row, every step
        ({"source": 3, "target": 1}, [[2, 3], [2], [2]]),  # StyleDiffusion's tau_v for the target
    ):
        mod = ValueModulation(scale, shift, until)
        for i, rows in enumerate(rows_by_step):
            values = mod.value_input(i, layout, context).values
            for r in range(4):
                want = context[r] * scale[i][0] + shift[i][0] if r in rows else context[r]
                torch.testing.assert_close(values[r], want)
    # and the loop hands it to the UNet: a modulated reconstruction differs from the plain one
    z = tuple(rand(1, 4, 8, 8, seed=30 + i) for i in range(steps + 1))
    emb = torch.cat([rand(1, 77, 32, seed=7), context[2:3]])
    plain = denoise(sd, BatchLayout.cfg(("source",)), emb, inversion=Inversion("t", z))
    modulated = denoise(sd, BatchLayout.cfg(("source",)), emb,
                        inversion=Inversion("t", z, values=ValueModulation(scale, shift)))
    silent = denoise(sd, BatchLayout.cfg(("source",)), emb,
                     inversion=Inversion("t", z, values=ValueModulation(scale, shift, {"source": 0})))
    assert not torch.allclose(plain.latents, modulated.latents)
    assert torch.equal(plain.latents, silent.latents)
