"""SPDInv (inversion/spdinv.py, docs/methods/spdinv.md) on the tiny-sd weights at 128 px and 20
steps, guidance 7.5, and its editing pairs on tiny-random:

- each step's fixed-point residual ends below the threshold, or the round limit is hit and recorded;
  the residual is recomputed here from the definition, not read from the method;
- the reconstruction (E(src) as the null embedding, as the editing loop uses it) beats DDIM's;
- the reference's PnP-script quirk (UNet at the start latent) makes one round that only shrinks the
  plain DDIM step by AdamW's weight decay;
- no weight gradient is built; the cost record counts what ran;
- spdinv+p2p (proximal + inversion guidance), spdinv+masactrl ([1, w], proximal on the target) and
  spdinv+pnp each change the target against the same run with the edit switched off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evaluation.api import edit
from evaluation.images import encode, load_image
from evaluation.registry import Registry
from inversion.ddim import invert_ddim
from inversion.method import InversionTask
from inversion.spdinv import SPDInvSettings, invert_spdinv
from ldm.context import BatchLayout
from ldm.model import StableDiffusion
from samplers.ddim import ddim_inverse_step
from samplers.loop import denoise
from samplers.noise import predict_noise
from samplers.schedule import Schedule
from tests.oracle_fixtures import ORACLE, SOURCE
from tests.test_loop import SMALL

STEPS = 20
W = 7.5


@pytest.fixture(scope="module")
def case(oracle_sd):
    z0 = encode(oracle_sd, load_image(ORACLE / "input.png", 128))  # (1, 4, 16, 16)
    null, src = oracle_sd.embed(["", SOURCE]).split(1)
    task = InversionTask(z0, src, null, Schedule(STEPS), W)
    return {"sd": oracle_sd, "z0": z0, "null": null, "src": src, "task": task,
            "ddim": invert_ddim(oracle_sd, task), "spd": invert_spdinv(oracle_sd, task)}


def residual(sd, z_prev, z, t, prompt, schedule) -> float:
    """mse(z, F(z)), F(z) = the DDIM inversion step from z_prev with the UNet read at z itself."""
    with torch.no_grad():
        return F.mse_loss(z, ddim_inverse_step(z_prev, predict_noise(sd, z, t, prompt), t, schedule)).item()


def test_every_step_reaches_the_fixed_point_threshold_or_the_round_limit(case) -> None:
    inv, settings, schedule = case["spd"], SPDInvSettings(), case["task"].schedule
    rounds = inv.cost.rounds_per_step
    assert len(rounds) == STEPS and all(1 <= r <= settings.rounds for r in rounds)
    for k, t in enumerate(reversed(schedule.timesteps)):
        losses = inv.losses[k]
        assert len(losses) == rounds[k]
        # stopped by the threshold (its last round's loss below it) or by the limit
        assert losses[-1] < settings.threshold or rounds[k] == settings.rounds, (k, losses)
        # the optimised latent is nearer its own fixed point than the plain DDIM step from the same start
        z_prev = inv.trajectory[k]
        with torch.no_grad():
            plain = ddim_inverse_step(z_prev, predict_noise(case["sd"], z_prev, t, case["src"]), t, schedule)
        ours = residual(case["sd"], z_prev, inv.trajectory[k + 1], t, case["src"], schedule)
        # (at the clean end the plain step is already below the threshold; one AdamW round may move it there)
        assert ours <= max(residual(case["sd"], z_prev, plain, t, case["src"], schedule) * 1.01, settings.threshold), k
    # measured: 1 round at the clean end, up to 25 at the noisy end
    assert rounds[0] < rounds[-1]


def test_reconstruction_beats_ddim_at_guidance_7_5(case) -> None:
    def recon(inversion) -> torch.Tensor:
        null = case["src"] if inversion.null_embeddings is not None else case["null"]
        return denoise(case["sd"], BatchLayout.cfg(("source",)), torch.cat([null, case["src"]]), inversion=inversion,
                       guidance=W).latents

    def rms(a):
        return float((a - case["z0"]).pow(2).mean().sqrt())

    spd, ddim = rms(recon(case["spd"])), rms(recon(case["ddim"]))
    assert spd < 0.5 * ddim, (spd, ddim)


def test_reference_pnp_quirk_pulls_toward_a_constant_target(case) -> None:
    """UNet at the step's plain DDIM latent z_ini: the target F(z_ini) is constant over the rounds, so
    the first round's loss is mse(z_ini, F(z_ini)), computed here from the definition."""
    schedule = Schedule(3)
    task = InversionTask(case["z0"], case["src"], case["null"], schedule, W)
    quirk = invert_spdinv(case["sd"], task, SPDInvSettings(unet_at_start=True, rounds=2))
    for k, t in enumerate(reversed(schedule.timesteps)):
        z_prev = quirk.trajectory[k]
        with torch.no_grad():
            z_ini = ddim_inverse_step(z_prev, predict_noise(case["sd"], z_prev, t, case["src"]), t, schedule)
            target = ddim_inverse_step(z_prev, predict_noise(case["sd"], z_ini, t, case["src"]), t, schedule)
        assert quirk.losses[k][0] == pytest.approx(F.mse_loss(z_ini, target).item(), rel=1e-3, abs=1e-12), k


def test_cost_counts_the_plain_steps_and_every_round(case) -> None:
    cost = case["spd"].cost
    rounds = sum(cost.rounds_per_step)
    assert cost.unet_rows == STEPS + rounds and cost.unet_rows_backward == rounds
    assert cost.seconds is not None and cost.as_dict()["rounds_total"] == rounds


def test_spdinv_builds_no_weight_gradients() -> None:
    sd = StableDiffusion.tiny_random(seed=1, config=SMALL)
    sd.requires_grad_(True)  # even a model left trainable by its owner
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    null, cake = sd.embed(["", "a cake"]).split(1)
    inv = invert_spdinv(sd, InversionTask(z0, cake, null, Schedule(2)), SPDInvSettings(rounds=2, threshold=0.0))
    assert inv.cost.rounds_per_step == (2, 2)
    assert all(p.grad is None for p in sd.parameters())
    assert all(p.requires_grad for p in sd.parameters())  # flags restored afterwards
    assert not any(z.requires_grad for z in inv.trajectory)


REGISTRY = Registry()
IDLE = {"spdinv+p2p": {"cross": 0.0, "self_": 0.0}, "spdinv+masactrl": {"start_step": 6},
        "spdinv+pnp": {"features": 0.0, "attention": 0.0}}


@pytest.fixture(scope="module")
def tiny() -> StableDiffusion:
    return StableDiffusion.tiny_random(seed=0)


@pytest.fixture(scope="module")
def photo():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(128, 128, 3, generator=g) * 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("pair", list(IDLE))
def test_each_spdinv_pair_changes_the_target(tiny, photo, pair) -> None:
    """Against the same run (same inversion, rows and guidance) with the edit's control switched off."""
    # 3 rounds a step: the composition, not the convergence, is under test here
    spec = REGISTRY.edit_spec(pair, source="a round cake on a plate", target="a square cake on a plate", steps=6,
                              rounds=3)
    edited = edit(tiny, photo, spec)
    inversion = edited.inversion
    idle = edit(tiny, photo, REGISTRY.edit_spec(pair, source=spec.source, target=spec.target, steps=6, rounds=3,
                                                allow_idle=True, **IDLE[pair]), inversion=inversion)
    assert edited.inversion.method == "spdinv" and len(edited.sites) > 0
    assert float((edited.latents[1] - idle.latents[1]).norm() / idle.latents[1].norm()) > 1e-4


def naive_inversion_guidance(latents, u, c, pivot, t, quantile=0.7, recon_t=400, recon_lr=1.0):
    """leeruibin/SPDInv P2P/ptp_utils.py diffusion_step's l0 branch and pull-back, in its structure."""
    score_delta = c - u
    threshold = score_delta.abs().quantile(quantile)
    score_delta = score_delta - score_delta.clamp(-threshold, threshold)
    if not (recon_t > 0 and t < recon_t):
        return latents
    mask_edit = (score_delta.abs() > threshold).float()
    mask_edit = F.max_pool2d(mask_edit, 3, 1, 1)
    return latents - recon_lr * (latents - pivot.expand_as(latents)) * (1 - mask_edit)


@pytest.mark.parametrize("t", [381, 401])
def test_inversion_guidance_equals_the_reference_structure(t) -> None:
    from ldm.context import AttnContext
    from samplers.prox import Proximal

    g = torch.Generator().manual_seed(0)
    u, c, latents = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
    c[0] = u[0]  # the source's direction is 0, as with E(src) on both of its rows
    pivot = torch.randn(1, 4, 16, 16, generator=g)
    ctx = AttnContext(0, t, 50, BatchLayout.cfg())
    ours = Proximal(7.5, 0.7, "l0", recon_t=400).pull_back(u, c, ctx, latents, pivot)
    torch.testing.assert_close(ours, naive_inversion_guidance(latents, u, c, pivot, t), rtol=0, atol=0)
    if t < 400:
        torch.testing.assert_close(ours[0], pivot[0], rtol=0, atol=1e-6)  # the source is pinned (z - (z - L))
        assert not torch.equal(ours[1], pivot[0]) and not torch.equal(ours[1], latents[1])
    else:
        assert torch.equal(ours, latents)
