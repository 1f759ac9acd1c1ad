"""EDICT (docs/methods/edict.md): the coupled step against the paper's equations transcribed here,
exact inversion in float64 through the editing API, the float32 option, `edict+direct_forward`
editing, and both commands. The SMALL random model (8x8 latents) at 5 steps: 4 active steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cli
from evaluation.api import edit, reconstruct
from evaluation.registry import Registry
from inversion.edict import EdictSettings
from ldm.errors import UsageError
from ldm.model import StableDiffusion
from samplers.edict import Coupling, active_timesteps, denoise_pair, invert_pair
from samplers.schedule import Schedule
from tests.test_loop import SMALL
from tests.test_reconstruct import IMAGE

STEPS = 5
ACTIVE = STEPS - int(STEPS * 0.8)  # the first grid point EDICT uses


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return StableDiffusion.tiny_random(seed=5, config=SMALL)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)


def paper_alphas(t: int) -> tuple[float, float]:
    """ab[t] and ab[t - 20] from the scaled-linear betas in numpy float64 (EDICT's own scheduler)."""
    ab = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2)
    return float(ab[t]), float(ab[t - 20] if t >= 20 else ab[0])


def paper_step(x: torch.Tensor, y: torch.Tensor, t: int, eps, p: float, y_first: bool):
    """Wallace et al. 2023, eqs. 14-15: x_inter = a x + b eps(y), y_inter = a y + b eps(x_inter),
    x' = p x_inter + (1 - p) y_inter, y' = p y_inter + (1 - p) x' (the roles of x and y swapped
    on leapfrog steps), a = sqrt(ab_prev / ab_t), b = sqrt(1 - ab_prev) - sqrt(ab_prev (1 - ab_t) / ab_t)."""
    ab_t, ab_prev = paper_alphas(t)
    a = (ab_prev / ab_t) ** 0.5
    b = (1 - ab_prev) ** 0.5 - (ab_prev * (1 - ab_t) / ab_t) ** 0.5
    if y_first:
        y_inter = a * y + b * eps(x, t)
        x_inter = a * x + b * eps(y_inter, t)
    else:
        x_inter = a * x + b * eps(y, t)
        y_inter = a * y + b * eps(x_inter, t)
    x_new = p * x_inter + (1 - p) * y_inter
    return x_new, p * y_inter + (1 - p) * x_new


def analytic_eps(z: torch.Tensor, t: int) -> torch.Tensor:
    """A smooth stand-in for the UNet, different at every timestep."""
    return torch.tanh(z * (1 + t / 1000)) * 0.7 + 0.1 * torch.sin(3 * z)


def test_edict_grid_is_780_to_0_of_980_to_0() -> None:
    grid = Schedule.edict(50)
    assert grid.timesteps[0] == 980 and grid.timesteps[-1] == 0
    active = active_timesteps(grid, 0.8)
    assert len(active) == 40 and active[0] == 780 and active[-1] == 0
    assert grid.alphas_cumprod.dtype == torch.float64
    assert float(grid.alpha(780)) == pytest.approx(paper_alphas(780)[0], rel=1e-12)


@pytest.mark.parametrize("step", [0, 1])
def test_coupled_step_is_the_papers_and_inverts_exactly(step) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(2, 1, 4, 8, 8, generator=g, dtype=torch.float64)
    grid, coupling = Schedule.edict(50), Coupling(0.93, True)
    t = 500
    ours = denoise_pair(x, y, step, t, analytic_eps, grid, coupling)
    paper = paper_step(x, y, t, analytic_eps, 0.93, y_first=step % 2 == 1)
    for a, b in zip(ours, paper):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    back = invert_pair(*ours, step, t, analytic_eps, grid, coupling)
    for a, b in zip(back, (x, y)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    # t = 0 reads the final alpha-bar ab[0] for t - 20: a = 1, b = 0, only the mixing acts
    x0, y0 = denoise_pair(x, y, step, 0, analytic_eps, grid, Coupling(1.0, True))
    torch.testing.assert_close(x0, x, rtol=0, atol=1e-15)


def test_edict_reconstructs_to_1e10_in_float64(sd, image) -> None:
    before = [p.detach().clone() for p in sd.unet.parameters()]
    spec = Registry().inversion_spec("edict", prompt="a round cake", steps=STEPS)
    res = reconstruct(sd, image, spec)
    inv = res.inversion
    assert res.latent.dtype == torch.float64 and inv.partner is not None
    err = (res.latent - res.z0.double()).abs().max().item()
    assert err < 1e-10, err  # measured ~5e-12
    assert len(inv.trajectory) == STEPS - ACTIVE + 1 and torch.equal(inv.trajectory[0], res.z0.double())
    assert (inv.z_T - inv.z0).abs().max() > 0.1  # it did move: noised to t = 80
    rows = 4 * (STEPS - ACTIVE)  # 2 sequences x [uncond, cond] per step
    assert res.unet_rows == {"inversion": rows, "denoise": rows, "total": 2 * rows}
    # the UNet ran in float64 and is back in float32, bit for bit
    assert sd.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(before, sd.unet.parameters()))


def test_edict_float32_option(sd, image) -> None:
    spec = Registry().inversion_spec("edict", prompt="a round cake", steps=STEPS, dtype="float32")
    res = reconstruct(sd, image, spec)
    err = (res.latent - res.z0).abs().max().item()
    assert res.latent.dtype == torch.float32
    assert 1e-10 < err < 1e-2, err  # float32 rounding, no longer exact


def test_edict_direct_forward_edits_the_target(sd, image) -> None:
    spec = Registry().edit_spec("edict+direct_forward", source="a round cake", target="a square cake", steps=STEPS)
    assert spec.inversion.name == "edict" and spec.method.name == "none"
    res = edit(sd, image, spec)
    source, target = res.latents[:1], res.latents[1:]
    assert (source - res.z0.double()).abs().max() < 1e-10  # the source prompt gives the photo back
    assert (target - source).abs().max() > 0.1  # the target prompt changes it
    assert res.unet_rows["edit"] == 8 * (STEPS - ACTIVE)


def test_edict_refuses_attention_control_and_empty_grids() -> None:
    with pytest.raises(UsageError, match="works with --control none"):
        Registry().edit_spec("edict+p2p", source="a cat", target="a dog")
    with pytest.raises(UsageError, match="none of the"):
        from inversion.edict import invert_edict
        from inversion.method import InversionTask

        z = torch.zeros(1, 4, 8, 8)
        invert_edict(None, InversionTask(z, torch.zeros(1, 77, 32), torch.zeros(1, 77, 32), Schedule(10)),
                     EdictSettings(strength=0.05))


def test_edict_from_the_command_line(tmp_path) -> None:
    out = tmp_path / "edit"
    rc = cli.main(["edit", "--model", "tiny-random", "--image", str(IMAGE), "--source", "a round cake",
                   "--target", "a square cake", "--target", "a round pie", "--method", "edict+direct_forward",
                   "--edict-dtype", "float32", "--steps", "5", "--size", "64", "--no-progress", "-o", str(out)])
    assert rc == 0  # two targets: one inversion, edited twice
    assert len(list(out.glob("*/edited.png"))) == 2
    rec = json.loads((out / "run.json").read_text())
    assert rec["inversion"]["method"] == "edict" and rec["inversion"]["cost"]["unet_rows"] == 4 * 4
    assert all("invert" in e["timings_s"] and "edit" in e["timings_s"] for e in rec["edits"][:1])
    rec_out = tmp_path / "rec"
    rc = cli.main(["reconstruct", "--model", "tiny-random", "--image", str(IMAGE), "--prompt", "a cake",
                   "--inversion", "edict", "--steps", "5", "--size", "64", "--no-progress", "-o", str(rec_out)])
    assert rc == 0 and (rec_out / "reconstruction.png").is_file()
