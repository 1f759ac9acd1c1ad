"""Edit-friendly DDPM inversion (inversion/edit_friendly.py, docs/methods/edit-friendly.md) and the
loop's stochastic step, on the tiny-sd weights at 128 px and 20 steps:

- the noised latents are the closed form sqrt(ab) z0 + sqrt(1 - ab) n with the seeded draws;
- the source branch, stepped at guidance 1 with the noise maps from the start step, reproduces the
  noised latents at every step (a trajectory recorder in the loop) and ends at the last step's mean;
- the same seed gives the same maps, another seed other maps;
- the stochastic step equals eq. 12 with eta written out in the test;
- the edit composes with P2P (replace for equal word counts, as the reference picks), MasaCtrl and
  no control, and P2P changes the target against the uncontrolled run.
"""

from __future__ import annotations

import pytest
import torch

from control.record import TrajectoryRecorder
from evaluation.api import edit, reconstruct
from evaluation.images import encode, load_image
from evaluation.registry import Registry
from inversion.edit_friendly import EditFriendlySettings, invert_edit_friendly, seeded_draws
from inversion.method import InversionTask
from ldm.context import BatchLayout
from ldm.errors import UsageError
from samplers.ddim import ddpm_step
from samplers.loop import denoise
from samplers.schedule import Schedule
from tests.oracle_fixtures import ORACLE, SOURCE, TARGET

STEPS = 20
SKIP = 5


@pytest.fixture(scope="module")
def case(oracle_sd):
    z0 = encode(oracle_sd, load_image(ORACLE / "input.png", 128))  # (1, 4, 16, 16)
    null, src, tgt = oracle_sd.embed(["", SOURCE, TARGET]).split(1)
    task = InversionTask(z0, src, null, Schedule(STEPS), 7.5, seed=7)
    inv = invert_edit_friendly(oracle_sd, task, EditFriendlySettings(skip=SKIP))
    return {"sd": oracle_sd, "z0": z0, "null": null, "src": src, "tgt": tgt, "task": task, "inv": inv}


def test_noised_latents_are_the_closed_form_of_the_seeded_draws(case) -> None:
    inv, z0, schedule = case["inv"], case["z0"], case["task"].schedule
    g = torch.Generator().manual_seed(7)
    draws = [torch.randn(z0.shape, generator=g) for _ in range(STEPS)]  # t ascending
    ab = schedule.alphas_cumprod
    for k, t in enumerate(reversed(schedule.timesteps), 1):
        expected = ab[t].sqrt() * z0 + (1 - ab[t]).sqrt() * draws[k - 1]
        # steps the edit runs re-assign x_k to what the step reproduces: rounding only
        torch.testing.assert_close(inv.trajectory[k], expected, rtol=0, atol=1e-5)
    assert inv.start == SKIP and len(inv.noise.maps) == STEPS - SKIP and inv.source_guidance == 1.0
    assert torch.equal(inv.z_T, inv.trajectory[STEPS - SKIP]) and not inv.noise.maps[-1].any()
    assert inv.cost.unet_rows == 2 * (STEPS - SKIP)


def test_source_branch_reproduces_the_noised_sequence(case) -> None:
    """Stepped at guidance 1 from x at the start step, the source lands on x_k after every step but
    the last, whose map is zero: there it ends at the step's mean."""
    inv, recorder = case["inv"], TrajectoryRecorder()
    out = denoise(case["sd"], BatchLayout.cfg(("source",)), torch.cat([case["null"], case["src"]]), inversion=inv,
                  controllers=(recorder,), guidance=7.5)  # the inversion's source_guidance overrides 7.5
    assert out.unet_calls == STEPS - SKIP and len(recorder.latents) == STEPS - SKIP
    for n, latent in enumerate(recorder.latents[:-1]):
        i = SKIP + n  # grid step; it should reach inv.pivot(i + 1)
        assert torch.equal(latent, inv.pivot(i + 1)), (i, float((latent - inv.pivot(i + 1)).abs().max()))
    # measured on this model: the last step's mean is 0.06 (rms) from z0
    assert 0 < float((out.latents - case["z0"]).pow(2).mean().sqrt()) < 0.2


def test_same_seed_same_maps_other_seed_other_maps(case) -> None:
    again = invert_edit_friendly(case["sd"], case["task"], EditFriendlySettings(skip=SKIP))
    assert all(torch.equal(a, b) for a, b in zip(again.noise.maps, case["inv"].noise.maps))
    other = invert_edit_friendly(case["sd"], InversionTask(**{**case["task"].__dict__, "seed": 8}),
                                 EditFriendlySettings(skip=SKIP))
    assert not torch.equal(other.noise.maps[0], case["inv"].noise.maps[0])
    assert torch.equal(seeded_draws(case["z0"], 3, 7), seeded_draws(case["z0"], 3, 7))


def test_stochastic_step_is_eq_12_with_eta() -> None:
    schedule = Schedule(50)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    for t, eta in ((981, 1.0), (501, 0.5), (1, 1.0)):
        a_t = float(schedule.alphas_cumprod[t])
        a_p = float(schedule.alphas_cumprod[t - 20]) if t >= 20 else float(schedule.alphas_cumprod[0])
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        x0 = (x.double() - (1 - a_t) ** 0.5 * eps.double()) / a_t**0.5
        expected = a_p**0.5 * x0 + (1 - a_p - eta * var) ** 0.5 * eps.double() + eta * var**0.5 * z.double()
        torch.testing.assert_close(ddpm_step(x, eps, t, schedule, eta, z).double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_usage_errors(case) -> None:
    with pytest.raises(UsageError, match="--ef-eta"):
        EditFriendlySettings(eta=0.0)
    with pytest.raises(UsageError, match="--ef-skip"):
        invert_edit_friendly(case["sd"], case["task"], EditFriendlySettings(skip=STEPS))


REGISTRY = Registry()


@pytest.fixture(scope="module")
def photo():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(128, 128, 3, generator=g) * 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def tiny_edits(photo):
    from ldm.model import StableDiffusion

    sd = StableDiffusion.tiny_random(seed=0)
    src, tgt = "a round cake on a plate", "a square cake on a plate"
    first = edit(sd, photo, REGISTRY.edit_spec("edit-friendly-inversion+p2p", source=src, target=tgt, steps=10, skip=3))
    out = {"p2p": first}
    for control in ("masactrl", "none"):
        spec = REGISTRY.edit_spec(inversion="edit-friendly", method=control, source=src, target=tgt, steps=10, skip=3)
        out[control] = edit(sd, photo, spec, inversion=first.inversion if control == "none" else None)
    out["sd"] = sd
    return out


def test_edit_friendly_pair_is_p2p_replace_at_16x16_and_changes_the_target(tiny_edits) -> None:
    p2p, none = tiny_edits["p2p"], tiny_edits["none"]
    settings = p2p.spec.method_settings
    assert settings.replace_if_same_length and settings.self_min_level == 2 and p2p.spec.inversion.name == "edit-friendly"
    assert p2p.unet_rows["edit"] == 4 * (10 - 3) and p2p.unet_rows["inversion"] == 2 * (10 - 3)
    # the source branch is the same (guidance 1, same maps) with and without control
    torch.testing.assert_close(p2p.latents[0], none.latents[0], rtol=0, atol=1e-5)
    assert float((p2p.latents[1] - none.latents[1]).norm() / none.latents[1].norm()) > 1e-4


def test_edit_friendly_composes_with_masactrl(tiny_edits) -> None:
    masa = tiny_edits["masactrl"]
    assert masa.inversion.method == "edit-friendly" and len(masa.sites) > 0
    assert torch.isfinite(masa.latents).all()


def test_reconstruct_follows_the_noised_sequence(tiny_edits, photo) -> None:
    spec = REGISTRY.inversion_spec("edit-friendly", prompt="a round cake on a plate", steps=10, skip=2)
    rec = reconstruct(tiny_edits["sd"], photo, spec)
    # the last step adds no noise: the reconstruction is its mean, close to z0
    assert rec.unet_rows["denoise"] == 2 * 8
    assert float((rec.latent - rec.z0).pow(2).mean().sqrt()) < 0.5 * float(rec.z0.pow(2).mean().sqrt())
