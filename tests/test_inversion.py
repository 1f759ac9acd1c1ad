"""Inversion methods on a tiny random SD (the tiny-sd pipeline's weights, at 128 px and 20 steps so
that a test costs seconds), guidance 7.5: what each method promises about reconstruction
(docs/methods/), and null-text's optimiser settings."""

from __future__ import annotations

import pytest
import torch

from dataclasses import replace

from control.base import ControllerBase
from evaluation.images import encode, load_image
from inversion.ddim import invert_ddim
from inversion.direct import DirectSettings, invert_direct
from inversion.method import InversionTask
from inversion.negative_prompt import NegativePromptSettings, invert_negative_prompt, slerp
from inversion.null_text import NullTextSettings, invert_null_text
from ldm.context import AttnContext, BatchLayout
from ldm.model import StableDiffusion
from samplers.inversion import Correction
from samplers.loop import denoise
from samplers.schedule import Schedule
from tests.oracle_fixtures import ORACLE, SOURCE, TARGET
from tests.test_loop import SMALL

STEPS = 20
W = 7.5


@pytest.fixture(scope="module")
def case(oracle_sd):
    z0 = encode(oracle_sd, load_image(ORACLE / "input.png", 128))  # (1, 4, 16, 16)
    null, src, tgt = oracle_sd.embed(["", SOURCE, TARGET]).split(1)
    task = InversionTask(z0, src, null, Schedule(STEPS), W)
    ddim = invert_ddim(oracle_sd, task)
    shared = task.with_trajectory(ddim.trajectory)  # every other method starts from this DDIM pass
    return {"sd": oracle_sd, "z0": z0, "null": null, "src": src, "tgt": tgt, "ddim": ddim, "task": task, "shared": shared}


@pytest.fixture(scope="module")
def null_text(case):
    return invert_null_text(case["sd"], case["shared"])


def recon(case, inversion, scale=W):
    c = torch.cat([case["null"], case["src"]])
    return denoise(case["sd"], BatchLayout.cfg(("source",)), c, inversion=inversion, guidance=scale).latents


def rms(a, b):
    return float(((a - b) ** 2).mean().sqrt())


def test_ddim_trajectory_layout(case) -> None:
    inv = case["ddim"]
    assert inv.steps == STEPS and len(inv.trajectory) == STEPS + 1
    assert torch.equal(inv.trajectory[0], case["z0"]) and torch.equal(inv.z_T, inv.trajectory[-1])
    assert inv.cost.unet_rows == STEPS and inv.null_embeddings is None and inv.corrections is None
    assert invert_ddim(case["sd"], case["shared"]).cost.unet_rows == 0  # a given trajectory costs nothing


def test_direct_inversion_reconstructs_to_float_precision_and_ddim_does_not(case) -> None:
    z0 = case["z0"]
    ddim_err = (recon(case, case["ddim"]) - z0).abs().max().item()
    for form in ("fused", "offset"):
        inv = invert_direct(case["sd"], case["shared"], DirectSettings(form=form))
        err = (recon(case, inv) - z0).abs().max().item()
        assert err < 1e-4, (form, err)
    assert ddim_err > 0.5  # measured ~5 on this model: guidance 7.5 drifts off the w=1 trajectory


class HalfBlend(ControllerBase):
    """Pulls the target halfway to the (corrected) source after every step, as LocalBlend does
    outside its mask: makes the target depend on the source correction."""

    def end_step(self, ctx: AttnContext, latents: torch.Tensor) -> torch.Tensor:
        out = latents.clone()
        out[1] = 0.5 * (latents[0] + latents[1])
        return out


def test_direct_inversion_offset_and_fused_forms_agree_on_an_edit(case) -> None:
    """Offsets recorded in the edit's own batch (as the reference does) replay exactly, so the two
    forms agree on both rows even when the controller couples the target to the source."""
    c = torch.cat([case["null"], case["null"], case["src"], case["tgt"]])
    outs = {}
    for form in ("fused", "offset"):
        inv = invert_direct(case["sd"], replace(case["shared"], target=case["tgt"]), DirectSettings(form=form))
        outs[form] = denoise(case["sd"], BatchLayout.cfg(), c, inversion=inv, controllers=(HalfBlend(),), guidance=W).latents
    torch.testing.assert_close(outs["fused"], outs["offset"], rtol=0, atol=1e-4)
    assert (outs["fused"][0] - case["z0"][0]).abs().max() < 1e-4
    assert (outs["fused"][1] - outs["fused"][0]).abs().max() > 1e-2  # the target still differs (measured 0.09)


def test_offset_form_offsets_fix_the_cfg_step(case) -> None:
    """Without the offsets the source follows plain CFG-7.5 DDIM (docs/methods/direct-inversion.md)."""
    inv = invert_direct(case["sd"], case["shared"], DirectSettings(form="offset"))
    assert len(inv.corrections.values) == STEPS and inv.corrections.role == "source"
    assert inv.cost.unet_rows == 2 * STEPS  # the offset pass on [E(""), E(src)]; the DDIM pass was given
    plain = recon(case, case["ddim"])
    zeroed = replace(inv, corrections=Correction("offset", tuple(torch.zeros_like(v) for v in inv.corrections.values)))
    torch.testing.assert_close(recon(case, zeroed), plain, rtol=0, atol=1e-5)


def test_negative_prompt_reconstructs_better_than_ddim_and_equals_guidance_one_ddim(case) -> None:
    npi = invert_negative_prompt(case["sd"], case["shared"], NegativePromptSettings())
    ours = recon(case, npi)
    assert rms(ours, case["z0"]) < 0.75 * rms(recon(case, case["ddim"]), case["z0"])
    # eps_u = eps_c = eps(z, E(src)): the guided step is the w = 1 step, whatever w
    # (docs/methods/negative-prompt.md)
    torch.testing.assert_close(ours, recon(case, case["ddim"], scale=1.0), rtol=0, atol=1e-4)


def test_slerp_interpolates_between_source_and_null(case) -> None:
    a, b = case["src"], case["null"]
    torch.testing.assert_close(slerp(0.0, a, b), a, rtol=0, atol=1e-5)
    torch.testing.assert_close(slerp(1.0, a, b), b, rtol=0, atol=1e-4)
    mid = slerp(0.5, a, b)
    # on the great circle: equal angles to both ends
    cos = lambda x, y: float((x.flatten() @ y.flatten()) / (x.norm() * y.norm()))  # noqa: E731
    assert abs(cos(mid, a) - cos(mid, b)) < 1e-4


def test_null_text_loss_falls_and_reconstructs_far_better_than_ddim(case, null_text) -> None:
    assert len(null_text.null_embeddings) == STEPS and len(null_text.losses) == STEPS
    assert all(u.shape == case["null"].shape for u in null_text.null_embeddings)
    # within each step the optimiser lowers the loss
    assert all(l[-1] < l[0] for l in null_text.losses if len(l) > 1)
    nti, ddim = rms(recon(case, null_text), case["z0"]), rms(recon(case, case["ddim"]), case["z0"])
    assert nti < 0.5 * ddim, (nti, ddim)


def test_null_text_lr_schedule_warm_start_and_break_after_update(case) -> None:
    """With a threshold every loss passes, each step makes exactly one Adam update, and Adam's first
    update moves every coordinate with a sizeable gradient by lr_i = 0.01 (1 - i/100); the next step
    starts from the updated embedding (warm start), so consecutive embeddings differ by lr_i."""
    inv = invert_null_text(case["sd"], case["shared"], NullTextSettings(early_stop=1e9))
    assert [len(l) for l in inv.losses] == [1] * STEPS
    prev = case["null"]
    for i, u in enumerate(inv.null_embeddings):
        step = (u - prev).abs()
        assert abs(step.max().item() - 0.01 * (1 - i / 100)) < 1e-6, i
        prev = u
    assert inv.cost.unet_rows == STEPS * (1 + 1 + 2) and inv.cost.unet_rows_backward == STEPS
    assert inv.cost.rounds_per_step == (1,) * STEPS


def test_null_text_builds_no_weight_gradients() -> None:
    sd = StableDiffusion.tiny_random(seed=1, config=SMALL)
    sd.requires_grad_(True)  # even a model left trainable by its owner
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    null, cake = sd.embed(["", "a cake"]).split(1)
    inv = invert_null_text(sd, InversionTask(z0, cake, null, Schedule(2)), NullTextSettings(inner_steps=2))
    assert all(p.grad is None for p in sd.parameters())
    assert all(p.requires_grad for p in sd.parameters())  # flags restored afterwards
    assert not any(u.requires_grad for u in inv.null_embeddings)
