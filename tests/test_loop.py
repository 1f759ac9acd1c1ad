"""The editing loop (samplers/loop.py, DESIGN.md §6) against a naive loop written here with
diffusers' DDIMScheduler, plus the row plumbing: reference rows fed from the trajectory, per-step
null embeddings on the uncond rows, corrections on the source role only, controller hooks."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from ldm.config import TINY, SDConfig, UNetConfig
from ldm.context import AttnContext, BatchLayout, NoControl, Row
from ldm.model import StableDiffusion
from samplers.guidance import ClassifierFree
from samplers.loop import denoise
from samplers.trajectory import Correction, Inversion

# attention at both levels, 8x8 latents: a UNet call costs milliseconds
SMALL = SDConfig(
    unet=UNetConfig(block_out_channels=(32, 32), attention_levels=(True, True), num_heads=(2, 2), context_dim=32),
    vae=TINY.vae,
    text=TINY.text,
)
STEPS = 6


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return StableDiffusion.tiny_random(seed=3, config=SMALL)


@pytest.fixture(scope="module")
def emb(sd: StableDiffusion) -> dict[str, torch.Tensor]:
    return dict(zip(["null", "src", "tgt"], sd.embed(["", "a round cake", "a square cake"]).split(1)))


def z(seed: int, n: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def naive(sd, z_T, uncond, cond, scale, steps=STEPS, fix=None):
    """Textbook CFG + diffusers' DDIM step, one prompt pair, batch 2 [uncond, cond]."""
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    sched.set_timesteps(steps)
    x = z_T.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            e_u, e_c = sd.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
            x = sched.step(e_u + scale * (e_c - e_u), t, x, eta=0.0).prev_sample
            if fix is not None:
                x = fix(i, x)
    return x


class Spy(torch.nn.Module):
    """Wraps a UNet and records every (x, t, context) it is called with."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.calls: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def forward(self, x, t, context, ctx=None):
        self.calls.append((x.clone(), int(t), context.clone()))
        return self.inner(x, t, context, ctx)


class SpySD(torch.nn.Module):
    def __init__(self, sd: StableDiffusion) -> None:
        super().__init__()
        self.unet = Spy(sd.unet)


def test_single_role_equals_naive_cfg_ddim_loop(sd, emb) -> None:
    layout = BatchLayout.cfg(("source",))
    out = denoise(sd, z(0), torch.cat([emb["null"], emb["src"]]), layout, NoControl(), 7.5, steps=STEPS, progress=False)
    assert out.roles == ("source",) and out.latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(out.role("source"), naive(sd, z(0), emb["null"], emb["src"], 7.5), rtol=1e-5, atol=1e-5)
    assert (out.unet_calls, out.unet_rows) == (STEPS, 2 * STEPS)


def test_two_roles_each_follow_their_own_prompt(sd, emb) -> None:
    layout = BatchLayout.cfg()  # [u_src, u_tgt, c_src, c_tgt]
    table = {Row("source", "uncond"): emb["null"], Row("target", "uncond"): emb["null"],
             Row("source", "cond"): emb["src"], Row("target", "cond"): emb["tgt"]}
    out = denoise(sd, z(1), table, layout, None, ClassifierFree(5.0), steps=STEPS, progress=False)
    assert out.roles == ("source", "target") and out.unet_rows == 4 * STEPS
    torch.testing.assert_close(out.role("source"), naive(sd, z(1), emb["null"], emb["src"], 5.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.role("target"), naive(sd, z(1), emb["null"], emb["tgt"], 5.0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.role("source"), out.role("target"))


def test_correction_touches_the_source_role_only(sd, emb) -> None:
    offsets = tuple(z(10 + i) * 0.1 for i in range(STEPS))
    inv = Inversion(z_T=z(2), trajectory=[z(2)] * (STEPS + 1), corrections=Correction("offset", offsets))
    layout = BatchLayout.cfg()
    c = torch.cat([emb["null"], emb["null"], emb["src"], emb["tgt"]])
    out = denoise(sd, None, c, layout, None, 7.5, inv, progress=False)
    want_src = naive(sd, z(2), emb["null"], emb["src"], 7.5, fix=lambda i, x: x + offsets[i])
    torch.testing.assert_close(out.role("source"), want_src, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.role("target"), naive(sd, z(2), emb["null"], emb["tgt"], 7.5), rtol=1e-5, atol=1e-5)


def test_null_embeddings_replace_every_uncond_row_per_step(sd, emb) -> None:
    nulls = [emb["null"] + 0.1 * i for i in range(STEPS)]
    inv = Inversion(z_T=z(3), trajectory=[z(3)] * (STEPS + 1), null_embeddings=nulls)
    spy = SpySD(sd)
    layout = BatchLayout.cfg()
    c = torch.cat([emb["null"], emb["null"], emb["src"], emb["tgt"]])
    denoise(spy, None, c, layout, None, 7.5, inv, progress=False)
    assert len(spy.unet.calls) == STEPS
    for i, (_, _, ctx_rows) in enumerate(spy.unet.calls):
        torch.testing.assert_close(ctx_rows[0:2], nulls[i].expand(2, -1, -1), rtol=0, atol=0)
        torch.testing.assert_close(ctx_rows[2:], torch.cat([emb["src"], emb["tgt"]]), rtol=0, atol=0)
    # and only the source role's uncond row when asked (the reference's single-branch ablation)
    spy.unet.calls.clear()
    denoise(spy, None, c, layout, None, 7.5, inv, null_roles=("source",), progress=False)
    torch.testing.assert_close(spy.unet.calls[3][2][1:2], emb["null"], rtol=0, atol=0)
    torch.testing.assert_close(spy.unet.calls[3][2][0:1], nulls[3], rtol=0, atol=0)


def test_reference_row_is_fed_the_trajectory_at_the_same_timestep_and_never_stepped(sd, emb) -> None:
    """Plug-and-Play layout [reference/cond, target/uncond, target/cond] (ALGORITHMS.md B §5.3)."""
    traj = [z(20 + k) for k in range(STEPS + 1)]
    inv = Inversion(z_T=traj[-1], trajectory=traj)
    layout = BatchLayout((Row("reference", "cond"), Row("target", "uncond"), Row("target", "cond")))
    assert layout.stepped_roles == ("target",)
    spy = SpySD(sd)
    c = torch.cat([emb["null"], emb["null"], emb["tgt"]])
    out = denoise(spy, None, c, layout, None, 7.5, inv, progress=False)
    timesteps = [call[1] for call in spy.unet.calls]
    ratio = 1000 // STEPS
    assert timesteps == [ratio * (STEPS - 1 - i) + 1 for i in range(STEPS)]
    for i, (x, _, _) in enumerate(spy.unet.calls):
        torch.testing.assert_close(x[0:1], traj[STEPS - i], rtol=0, atol=0)  # L[-1-i]
    assert out.roles == ("target",)
    torch.testing.assert_close(out.latents, naive(sd, traj[-1], emb["null"], emb["tgt"], 7.5), rtol=1e-5, atol=1e-5)


class Recorder(NoControl):
    def __init__(self) -> None:
        self.begun: list[AttnContext] = []

    def begin_step(self, ctx: AttnContext) -> None:
        self.begun.append(ctx)

    def end_step(self, ctx: AttnContext, latents: torch.Tensor) -> torch.Tensor:
        # replaces the target by the source: the loop must carry this into the next step
        out = latents.clone()
        out[1] = latents[0]
        return out


def test_controller_hooks_see_each_step_and_end_step_result_is_used(sd, emb) -> None:
    rec = Recorder()
    layout = BatchLayout.cfg()
    c = torch.cat([emb["null"], emb["null"], emb["src"], emb["tgt"]])
    out = denoise(sd, z(4), c, layout, rec, 7.5, steps=STEPS, progress=False)
    assert [ctx.step for ctx in rec.begun] == list(range(STEPS))
    assert rec.begun[0].timestep == 1000 // STEPS * (STEPS - 1) + 1 and rec.begun[-1].timestep == 1
    assert all(ctx.layout == layout and ctx.controller is rec and ctx.num_steps == STEPS for ctx in rec.begun)
    torch.testing.assert_close(out.role("target"), out.role("source"), rtol=0, atol=0)
    torch.testing.assert_close(out.role("source"), naive(sd, z(4), emb["null"], emb["src"], 7.5), rtol=1e-5, atol=1e-5)


def test_misuse_is_reported(sd, emb) -> None:
    layout = BatchLayout.cfg(("source",))
    with pytest.raises(ValueError, match="embeddings"):
        denoise(sd, z(0), emb["src"], layout, steps=2, progress=False)
    ref_layout = BatchLayout((Row("reference", "cond"), Row("target", "cond")))
    with pytest.raises(ValueError, match="reference"):
        denoise(sd, z(0), torch.cat([emb["src"]] * 2), ref_layout, steps=2, progress=False)
    inv = Inversion(z_T=z(0), trajectory=[z(0)] * 4)
    with pytest.raises(ValueError, match="steps"):
        denoise(sd, None, torch.cat([emb["null"], emb["src"]]), layout, inversion=inv, steps=5, progress=False)
