"""The editing loop (samplers/loop.py) against a naive loop written here with diffusers'
DDIMScheduler, plus the row plumbing: reference rows fed from the trajectory, per-step null
embeddings on the uncond rows, corrections on the source role only, controller lifecycle and
composition, and step hooks that take gradients while the loop itself builds no graph."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from ldm.config import TINY, SDConfig, UNetConfig
from dataclasses import replace

from control.base import ControllerBase
from ldm.context import AttnContext, BatchLayout, Row
from ldm.model import StableDiffusion
from samplers.guidance import ClassifierFree
from samplers.inversion import Correction, Inversion
from samplers.loop import StepState, denoise

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


def naive(sd, z_T, uncond, cond, scale, steps=STEPS, fix=None, before=None):
    """Textbook CFG + diffusers' DDIM step, one prompt pair, batch 2 [uncond, cond]."""
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    sched.set_timesteps(steps)
    x = z_T.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            if before is not None:
                x = before(i, x)
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
        self.dtype = sd.dtype
        self.config = sd.config  # predict_noise reads the prediction type there


def test_single_role_equals_naive_cfg_ddim_loop(sd, emb) -> None:
    layout = BatchLayout.cfg(("source",))
    out = denoise(sd, layout, torch.cat([emb["null"], emb["src"]]), z_T=z(0), guidance=7.5, steps=STEPS)
    assert out.roles == ("source",) and out.latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(out.role("source"), naive(sd, z(0), emb["null"], emb["src"], 7.5), rtol=1e-5, atol=1e-5)
    assert (out.unet_calls, out.unet_rows) == (STEPS, 2 * STEPS)


def test_two_roles_each_follow_their_own_prompt(sd, emb) -> None:
    """Batch 4 against the naive loop's batch 2: oneDNN may round a row differently at another
    batch size, so the bound is 1e-4 (measured up to 3.4e-5 on 2 cores)."""
    layout = BatchLayout.cfg()  # [u_src, u_tgt, c_src, c_tgt]
    table = {Row("source", "uncond"): emb["null"], Row("target", "uncond"): emb["null"],
             Row("source", "cond"): emb["src"], Row("target", "cond"): emb["tgt"]}
    out = denoise(sd, layout, table, z_T=z(1), guidance=ClassifierFree(5.0), steps=STEPS)
    assert out.roles == ("source", "target") and out.unet_rows == 4 * STEPS
    torch.testing.assert_close(out.role("source"), naive(sd, z(1), emb["null"], emb["src"], 5.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.role("target"), naive(sd, z(1), emb["null"], emb["tgt"], 5.0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.role("source"), out.role("target"))


def test_each_role_can_have_its_own_guidance_scale(sd, emb) -> None:
    """Edit-friendly DDPM's per-branch scales [1, 7.5]: the source follows the conditional
    prediction alone, the target CFG 7.5."""
    layout = BatchLayout.cfg()
    c = torch.cat([emb["null"], emb["null"], emb["src"], emb["tgt"]])
    out = denoise(sd, layout, c, z_T=z(5), guidance=ClassifierFree(7.5, {"source": 1.0}), steps=STEPS)
    torch.testing.assert_close(out.role("source"), naive(sd, z(5), emb["null"], emb["src"], 1.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.role("target"), naive(sd, z(5), emb["null"], emb["tgt"], 7.5), rtol=1e-4, atol=1e-4)


def test_correction_touches_the_source_role_only(sd, emb) -> None:
    offsets = tuple(z(10 + i) * 0.1 for i in range(STEPS))
    inv = Inversion("test", (z(2),) * (STEPS + 1), corrections=Correction("offset", offsets))
    layout = BatchLayout.cfg()
    c = torch.cat([emb["null"], emb["null"], emb["src"], emb["tgt"]])
    out = denoise(sd, layout, c, inversion=inv, guidance=7.5)
    want_src = naive(sd, z(2), emb["null"], emb["src"], 7.5, fix=lambda i, x: x + offsets[i])
    torch.testing.assert_close(out.role("source"), want_src, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.role("target"), naive(sd, z(2), emb["null"], emb["tgt"], 7.5), rtol=1e-4, atol=1e-4)


def test_null_embeddings_replace_every_uncond_row_per_step(sd, emb) -> None:
    nulls = tuple(emb["null"] + 0.1 * i for i in range(STEPS))
    inv = Inversion("test", (z(3),) * (STEPS + 1), null_embeddings=nulls)
    spy = SpySD(sd)
    layout = BatchLayout.cfg()
    c = torch.cat([emb["null"], emb["null"], emb["src"], emb["tgt"]])
    denoise(spy, layout, c, inversion=inv, guidance=7.5)
    assert len(spy.unet.calls) == STEPS
    for i, (_, _, ctx_rows) in enumerate(spy.unet.calls):
        torch.testing.assert_close(ctx_rows[0:2], nulls[i].expand(2, -1, -1), rtol=0, atol=0)
        torch.testing.assert_close(ctx_rows[2:], torch.cat([emb["src"], emb["tgt"]]), rtol=0, atol=0)
    # and only the source role's uncond row when the inversion says so (the reference's single-branch ablation)
    spy.unet.calls.clear()
    denoise(spy, layout, c, inversion=replace(inv, null_roles=("source",)), guidance=7.5)
    torch.testing.assert_close(spy.unet.calls[3][2][1:2], emb["null"], rtol=0, atol=0)
    torch.testing.assert_close(spy.unet.calls[3][2][0:1], nulls[3], rtol=0, atol=0)


def test_reference_row_is_fed_the_trajectory_at_the_same_timestep_and_never_stepped(sd, emb) -> None:
    """Plug-and-Play layout [reference/cond, target/uncond, target/cond] (docs/methods/plug-and-play.md)."""
    traj = tuple(z(20 + k) for k in range(STEPS + 1))
    inv = Inversion("test", traj)
    layout = BatchLayout((Row("reference", "cond"), Row("target", "uncond"), Row("target", "cond")))
    assert layout.stepped_roles == ("target",)
    spy = SpySD(sd)
    c = torch.cat([emb["null"], emb["null"], emb["tgt"]])
    out = denoise(spy, layout, c, inversion=inv, guidance=7.5)
    timesteps = [call[1] for call in spy.unet.calls]
    ratio = 1000 // STEPS
    assert timesteps == [ratio * (STEPS - 1 - i) + 1 for i in range(STEPS)]
    for i, (x, _, _) in enumerate(spy.unet.calls):
        torch.testing.assert_close(x[0:1], traj[STEPS - i], rtol=0, atol=0)  # L[-1-i]
    assert out.roles == ("target",)
    torch.testing.assert_close(out.latents, naive(sd, traj[-1], emb["null"], emb["tgt"], 7.5), rtol=1e-4, atol=1e-4)


class Recorder(ControllerBase):
    def __init__(self) -> None:
        super().__init__()
        self.begun: list[AttnContext] = []
        self.starts = 0

    def start(self, run) -> None:
        super().start(run)
        self.starts += 1
        self.begun = []

    def begin_step(self, ctx: AttnContext) -> None:
        self.begun.append(ctx)

    def end_step(self, ctx: AttnContext, latents: torch.Tensor) -> torch.Tensor:
        # replaces the target by the source: the loop must carry this into the next step
        out = latents.clone()
        out[1] = latents[0]
        return out


def test_controller_lifecycle_each_step_and_end_step_result_is_used(sd, emb) -> None:
    rec = Recorder()
    layout = BatchLayout.cfg()
    c = torch.cat([emb["null"], emb["null"], emb["src"], emb["tgt"]])
    for run in (1, 2):  # the loop starts the controller before every run
        out = denoise(sd, layout, c, z_T=z(4), controllers=(rec,), guidance=7.5, steps=STEPS)
        assert rec.starts == run and [ctx.step for ctx in rec.begun] == list(range(STEPS))
    assert rec.begun[0].timestep == 1000 // STEPS * (STEPS - 1) + 1 and rec.begun[-1].timestep == 1
    assert all(ctx.layout == layout and ctx.controllers == (rec,) and ctx.num_steps == STEPS for ctx in rec.begun)
    torch.testing.assert_close(out.role("target"), out.role("source"), rtol=0, atol=0)
    torch.testing.assert_close(out.role("source"), naive(sd, z(4), emb["null"], emb["src"], 7.5), rtol=1e-4, atol=1e-4)


class Halve(ControllerBase):
    """Decides the output of every self-attention layer: half the plain attention."""

    def attend(self, q, k, v, site, ctx):
        return None if site.kind == "cross" else 0.5 * torch.nn.functional.scaled_dot_product_attention(q, k, v)


class Zero(ControllerBase):
    """Would zero every attention output, if asked."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def attend(self, q, k, v, site, ctx):
        self.asked.append(site.kind)
        return torch.zeros_like(q)


def test_controllers_compose_in_order_the_first_that_decides_wins(sd, emb) -> None:
    """A controller that returns None passes the call on; one that returns a tensor decides and
    the later ones are not asked. Plain attention when no controller decides."""
    layout = BatchLayout.cfg(("source",))
    c = torch.cat([emb["null"], emb["src"]])
    zero = Zero()
    halved = denoise(sd, layout, c, z_T=z(6), controllers=(Halve(), zero), steps=2).latents
    assert set(zero.asked) == {"cross"}  # self-attention was decided before it
    only_zero = denoise(sd, layout, c, z_T=z(6), controllers=(Zero(),), steps=2).latents
    plain = denoise(sd, layout, c, z_T=z(6), controllers=(ControllerBase(),), steps=2).latents
    torch.testing.assert_close(plain, denoise(sd, layout, c, z_T=z(6), steps=2).latents, rtol=0, atol=0)
    assert not torch.allclose(halved, only_zero) and not torch.allclose(halved, plain)


class ShrinkLatents:
    """A step hook taking a gradient: x <- x - 0.1 d/dx (0.5 |x|^2) = 0.9 x, before each UNet call."""

    def __init__(self) -> None:
        self.grad_modes: list[bool] = []

    def start(self, run) -> None:
        self.grad_modes = []

    def before_unet(self, sd, state: StepState) -> StepState:
        self.grad_modes.append(torch.is_grad_enabled())
        x = state.latents.detach().requires_grad_(True)
        (0.5 * x.pow(2).sum()).backward()
        return replace(state, latents=x - 0.1 * x.grad)


class GradientProbe(ControllerBase):
    def __init__(self) -> None:
        super().__init__()
        self.grad_modes: list[bool] = []

    def begin_step(self, ctx) -> None:
        self.grad_modes.append(torch.is_grad_enabled())


def test_a_step_hook_takes_gradients_and_the_loop_builds_no_graph(sd, emb) -> None:
    hook, probe = ShrinkLatents(), GradientProbe()
    layout = BatchLayout.cfg(("source",))
    out = denoise(sd, layout, torch.cat([emb["null"], emb["src"]]), z_T=z(7), controllers=(probe,), hooks=(hook,),
                  guidance=7.5, steps=STEPS)
    assert hook.grad_modes == [True] * STEPS and probe.grad_modes == [False] * STEPS
    assert not out.latents.requires_grad and all(p.grad is None for p in sd.parameters())
    want = naive(sd, z(7), emb["null"], emb["src"], 7.5, before=lambda i, x: 0.9 * x)
    torch.testing.assert_close(out.latents, want, rtol=1e-4, atol=1e-4)


def test_misuse_is_reported(sd, emb) -> None:
    layout = BatchLayout.cfg(("source",))
    with pytest.raises(ValueError, match="embeddings"):
        denoise(sd, layout, emb["src"], z_T=z(0), steps=2)
    ref_layout = BatchLayout((Row("reference", "cond"), Row("target", "cond")))
    with pytest.raises(ValueError, match="reference"):
        denoise(sd, ref_layout, torch.cat([emb["src"]] * 2), z_T=z(0), steps=2)
    inv = Inversion("test", (z(0),) * 4)
    with pytest.raises(ValueError, match="steps"):
        denoise(sd, layout, torch.cat([emb["null"], emb["src"]]), inversion=inv, steps=5)
