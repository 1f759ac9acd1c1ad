"""v-prediction (SD-2.x 768-v) against diffusers' schedulers in v-prediction mode.

Oracles: diffusers' DDIMScheduler / DDIMInverseScheduler with prediction_type="v_prediction",
driven by naive loops written here around our UNet (the epsilon counterparts are in
tests/test_loop.py), and the analytic identity of the v parameterisation. The model is the tiny
random SD-2 (`ldm.config.TINY_SD2`: v-prediction, linear projections, per-level head counts) at
128 px. Steps started from the same latents agree to float rounding (about 2e-6 on latents of
size ~5); a whole free-running edit through the random UNet at guidance 7.5 amplifies that
rounding to about 2e-4, so it is held to 1e-3 (each test states what was measured).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from control.base import ControllerBase
from evaluation.api import edit, edit_inputs, plan_edit, reconstruct
from evaluation.registry import Registry
from inversion.ddim import ddim_trajectory
from inversion.method import InversionTask
from ldm.config import TINY_SD2
from ldm.context import AttnContext, BatchLayout, RunInfo
from ldm.model import StableDiffusion, open_model
from samplers.ddim import ddim_inverse_step, ddim_step
from samplers.loop import denoise
from samplers.noise import predict_noise, v_to_noise
from samplers.schedule import Schedule

REGISTRY = Registry()
STEPS = 10
SRC = "a round cake with orange frosting on a wooden plate"
TGT = "a square cake with orange frosting on a wooden plate"
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    model = open_model("tiny-random-sd2")
    assert model.config == TINY_SD2 and model.config.unet.prediction_type == "v_prediction"
    return model


@pytest.fixture(scope="module")
def emb(sd):
    return dict(zip(["null", "src", "tgt"], sd.embed(["", SRC, TGT]).split(1)))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)


def z(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_v_to_noise_recovers_the_noise_a_sample_was_made_with():
    """x = sqrt(ab) x0 + sqrt(1 - ab) eps, v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022) -> eps."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)
    for ab in (0.9991, 0.5, 0.0047):
        a = torch.tensor(ab, dtype=torch.float64)
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        torch.testing.assert_close(v_to_noise(v.float(), x.float(), a.float()), eps.float(), rtol=0, atol=2e-6)


def test_every_ddim_step_with_v_equals_diffusers_v_step(sd, emb):
    """Same sample, same UNet output, every timestep of the grid: one step of ours (the output
    converted by predict_noise, then the eps step) against DDIMScheduler.step in v mode."""
    sched = DDIMScheduler(**SCHEDULER)
    sched.set_timesteps(STEPS)
    schedule = Schedule(STEPS)
    assert list(sched.timesteps) == list(schedule.timesteps)
    x = 2 * z(0)
    with torch.no_grad():
        for t in schedule.timesteps:
            v = sd.unet(x, t, emb["src"])
            ours = ddim_step(x, predict_noise(sd, x, t, emb["src"]), t, schedule)
            want = sched.step(v, t, x, eta=0.0).prev_sample
            torch.testing.assert_close(ours, want, rtol=0, atol=5e-6)  # measured 1.9e-6, |x| <= 7.5
            x = want


def naive_inversion(sd, z0, cond, steps=STEPS):
    """diffusers' DDIMInverseScheduler in v mode: the pipelines' loop (unet at t, then step at t)."""
    sched = DDIMInverseScheduler(**SCHEDULER)
    sched.set_timesteps(steps)
    x, out = z0.clone(), [z0]
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(sd.unet(x, t, cond), t, x).prev_sample
            out.append(x)
    return out


def test_ddim_inversion_with_v_equals_diffusers_inverse_scheduler(sd, emb):
    """The inversion step queries L[k] at the noisier label t and converts v at L[k]'s own level,
    as DDIMInverseScheduler does; converting at the label's level would be another trajectory."""
    task = InversionTask(z(1), emb["src"], emb["null"], Schedule(STEPS))
    ours = ddim_trajectory(sd, task)
    want = naive_inversion(sd, z(1), emb["src"])
    assert len(ours) == len(want) == STEPS + 1
    for k, (a, b) in enumerate(zip(ours, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"L[{k}]")  # measured 1.7e-6

    # the test can tell the two readings apart: converting at the label t drifts by far more
    schedule, x = task.schedule, z(1)
    with torch.no_grad():
        for t in reversed(schedule.timesteps):
            x = ddim_inverse_step(x, predict_noise(sd, x, t, emb["src"]), t, schedule)
    assert (x - want[-1]).abs().max() > 0.1  # measured 1.05


def naive_edit(sd, z_T, context, layout, controllers, scale, starts=None, steps=STEPS):
    """DDIMScheduler in v mode stepping every role of `layout` (no reference rows) after textbook
    CFG, with the controllers driven through the contract of ldm/context.py. Returns the latents
    after every step; `starts[i]`, when given, replaces the latents step i starts from."""
    sched = DDIMScheduler(**SCHEDULER)
    sched.set_timesteps(steps)
    roles = layout.stepped_roles
    x = z_T.expand(len(roles), -1, -1, -1).clone()
    run = RunInfo(layout=layout, num_steps=steps, device=x.device, latent_hw=tuple(x.shape[-2:]))
    for c in controllers:
        c.start(run)
    feed = [roles.index(row.role) for row in layout.rows]
    out = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            if starts is not None:
                x = starts[i]
            ctx = AttnContext(step=i, timestep=int(t), num_steps=steps, layout=layout, controllers=tuple(controllers))
            for c in controllers:
                c.begin_step(ctx)
            pred = sd.unet(x[feed], t, context, ctx)
            guided = []
            for role in roles:
                u, c_ = pred[layout.index(role, "uncond")], pred[layout.index(role, "cond")]
                guided.append(u + scale * (c_ - u))
            x = sched.step(torch.stack(guided), t, x, eta=0.0).prev_sample
            for c in controllers:
                x = c.end_step(ctx, x)
            out.append(x)
    return out


class StepLatents(ControllerBase):
    """Records the latents after every step (composed last, it sees what the loop carries on)."""

    def start(self, run) -> None:
        super().start(run)
        self.latents: list[torch.Tensor] = []

    def end_step(self, ctx, latents):
        self.latents.append(latents.clone())
        return latents


def test_ddim_p2p_edit_with_v_equals_the_edit_on_diffusers_schedulers(sd, image):
    """ddim+p2p with LocalBlend (so end_step acts too) as `edit` runs it, against the same edit on
    diffusers' schedulers in v mode with a fresh controller from the same plan: the inversion, then
    each of the 4-row P2P steps started from our latents (same inputs: float rounding only,
    measured 1.2e-6), then the whole free-running edit (rounding amplified by the random UNet at
    guidance 7.5: measured 1.6e-4 to 2.2e-4 on latents up to 5; the edit itself moves the target by 3.3)."""
    spec = REGISTRY.edit_spec(inversion="ddim", method="p2p", source=SRC, target=TGT, steps=STEPS,
                              blend=("cake", "cake"), blend_start=0.1)
    result = edit(sd, image, spec)
    plan = plan_edit(sd, spec)
    z0, embeddings = edit_inputs(sd, image, spec, plan)
    torch.testing.assert_close(z0, result.z0, rtol=0, atol=0)
    z_T = naive_inversion(sd, z0, embeddings[plan.inversion_prompt])[-1]
    torch.testing.assert_close(result.inversion.z_T, z_T, rtol=0, atol=2e-5)  # measured 5e-6 to 7.5e-6

    texts = {row: embeddings[text] for row, text in plan.prompts.items()}
    steps = StepLatents()
    ours = denoise(sd, plan.layout, texts, inversion=result.inversion, controllers=(*plan.controllers, steps),
                   guidance=plan.guidance)
    torch.testing.assert_close(ours.latents, result.latents, rtol=0, atol=0)  # the edit `edit` made
    context = torch.cat([texts[row] for row in plan.layout.rows])
    starts = [result.inversion.z_T.expand(2, -1, -1, -1), *steps.latents[:-1]]
    forced = naive_edit(sd, result.inversion.z_T, context, plan.layout, plan_edit(sd, spec).controllers,
                        spec.guidance, starts=starts)
    for i, (a, b) in enumerate(zip(steps.latents, forced)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {i}")

    free = naive_edit(sd, z_T, context, plan.layout, plan_edit(sd, spec).controllers, spec.guidance)[-1]
    torch.testing.assert_close(result.latents, free, rtol=0, atol=1e-3)
    assert (free[1] - free[0]).abs().max() > 1e-2  # and it is an edit: the target left the source


def test_direct_inversion_reconstructs_exactly_with_v_and_ddim_does_not(sd, image):
    """Guidance 7.5 reconstruction: DirectInversion (both forms) lands on z0 to float precision."""
    errors = {}
    for name, settings in (("ddim", {}), ("direct", {"form": "fused"}), ("direct", {"form": "offset"})):
        spec = REGISTRY.inversion_spec(name, prompt=SRC, steps=STEPS, **settings)
        result = reconstruct(sd, image, spec)
        errors[name, settings.get("form")] = (result.latent - result.z0).abs().max().item()
    assert errors["direct", "fused"] == 0.0 and errors["direct", "offset"] < 1e-5, errors  # measured 0 and 4e-9
    assert errors["ddim", None] > 0.5, errors  # measured 4.4: guidance 7.5 leaves the w = 1 trajectory


def test_an_epsilon_model_reads_the_unet_output_as_is(sd, emb):
    """The conversion applies to v models only: the same weights declared epsilon give the raw output."""
    eps_sd = StableDiffusion(replace(sd.config, unet=replace(sd.config.unet, prediction_type="epsilon")),
                             sd.unet, sd.vae, sd.text, sd.tokenizer)
    x = z(2)
    with torch.no_grad():
        raw = sd.unet(x, 501, emb["src"])
    torch.testing.assert_close(predict_noise(eps_sd, x, 501, emb["src"]), raw, rtol=0, atol=0)
    assert not torch.allclose(predict_noise(sd, x, 501, emb["src"]), raw)
    layout = BatchLayout.cfg(("source",))
    a = denoise(sd, layout, torch.cat([emb["null"], emb["src"]]), z_T=x, steps=3).latents
    b = denoise(eps_sd, layout, torch.cat([emb["null"], emb["src"]]), z_T=x, steps=3).latents
    assert (a - b).abs().max() > 1e-2
