"""The noise schedule, the grid and the DDIM steps against diffusers' schedulers as the reference
configures them (docs/methods/README.md "The schedule and the grid", "The DDIM step", "The inversion
step"), plus an analytic model with exact inversion."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from samplers.ddim import ddim_inverse_step, ddim_step
from samplers.schedule import Schedule, alphas_cumprod

REFERENCE_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,  # forced by StableDiffusionPipeline's deprecation shim (docs/methods/README.md)
)


def diffusers_ddim(steps: int = 50) -> DDIMScheduler:
    sched = DDIMScheduler(**REFERENCE_CONFIG)
    sched.set_timesteps(steps)
    return sched


def test_alphas_cumprod_equals_diffusers_scaled_linear() -> None:
    assert torch.equal(alphas_cumprod(), diffusers_ddim().alphas_cumprod)


def test_constants_of_the_table_in_the_methods_index() -> None:
    s = Schedule()
    assert abs(s.final_alpha_cumprod.item() - 0.99915) < 1e-7
    for t, ab in [(1, 0.998296), (21, 0.980381), (481, 0.302296), (961, 0.007282), (981, 0.005775)]:
        assert abs(s.alpha(t).item() - ab) < 1e-6


@pytest.mark.parametrize("steps", [50, 10, 7, 1])
def test_grid_equals_diffusers_leading_spacing_with_offset_one(steps: int) -> None:
    s = Schedule(steps=steps)
    assert list(s.timesteps) == diffusers_ddim(steps).timesteps.tolist()


def test_grid_of_the_reference_and_of_edict() -> None:
    t = Schedule().timesteps
    assert (len(t), t[0], t[1], t[-1]) == (50, 981, 961, 1)
    e = Schedule.edict().timesteps
    assert (e[0], e[-1]) == (980, 0)
    assert Schedule().final_alpha_cumprod.item() == alphas_cumprod()[0].item()


def test_ddim_step_equals_diffusers_ddim_scheduler_step() -> None:
    sched = diffusers_ddim()
    s = Schedule()
    gen = torch.Generator().manual_seed(0)
    for t in s.timesteps:  # includes t = 1, whose previous timestep is negative -> ab[0]
        z = torch.randn(2, 4, 8, 8, generator=gen)
        e = torch.randn(2, 4, 8, 8, generator=gen)
        want = sched.step(e, t, z, eta=0.0).prev_sample
        torch.testing.assert_close(ddim_step(z, e, t, s), want, rtol=1e-6, atol=1e-6)


def test_ddim_inverse_step_equals_diffusers_inverse_scheduler() -> None:
    inv = DDIMInverseScheduler(**REFERENCE_CONFIG)
    inv.set_timesteps(50)
    s = Schedule()
    assert inv.timesteps.tolist() == list(reversed(s.timesteps))
    gen = torch.Generator().manual_seed(1)
    for t in inv.timesteps.tolist():  # 1, 21, ..., 981: the label of the noisier end
        z = torch.randn(1, 4, 8, 8, generator=gen)
        e = torch.randn(1, 4, 8, 8, generator=gen)
        want = inv.step(e, t, z).prev_sample
        torch.testing.assert_close(ddim_inverse_step(z, e, t, s), want, rtol=1e-6, atol=1e-6)


def test_ddim_inverse_step_inverts_ddim_step_for_the_same_eps() -> None:
    s = Schedule()
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=gen)
    e = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=gen)
    for t in s.timesteps:
        torch.testing.assert_close(ddim_inverse_step(ddim_step(z, e, t, s), e, t, s), z, rtol=0, atol=1e-9)


def test_invert_then_sample_is_exact_for_an_analytic_noise_model() -> None:
    """Data = one point x0*: the optimal eps(z, t) = (z - sqrt(ab_t) x0*) / sqrt(1 - ab_t) is exact,
    and with it every DDIM state is sqrt(ab) x0* + sqrt(1-ab) n for one fixed n. Inversion queried at
    the noisier label (the reference's convention) then sampling returns the input exactly."""
    s = Schedule()
    gen = torch.Generator().manual_seed(3)
    x_star = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=gen)
    ab = s.alphas_cumprod.double()

    def eps(z: torch.Tensor, t: int) -> torch.Tensor:
        a = ab[t] if t >= 0 else ab[0]
        return (z - a.sqrt() * x_star) / (1 - a).sqrt()

    noise = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=gen)
    z0 = ab[0].sqrt() * x_star + (1 - ab[0]).sqrt() * noise  # lives at ab[0] (final_alpha_cumprod)
    z = z0
    for t in reversed(s.timesteps):
        # the exact model queried at the sample's own timestep: eps = n exactly, so inversion is exact
        z = ddim_inverse_step(z, eps(z, s.prev(t)), t, s)
    torch.testing.assert_close(z, ab[981].sqrt() * x_star + (1 - ab[981]).sqrt() * noise, rtol=0, atol=1e-9)
    for t in s.timesteps:
        z = ddim_step(z, eps(z, t), t, s)
    torch.testing.assert_close(z, z0, rtol=0, atol=1e-9)
