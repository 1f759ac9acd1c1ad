"""EDICT: exact inversion through coupled transformations (Wallace, Gokul & Naik, CVPR 2023, eq. 16;
docs/methods/edict.md).

The photo's latent starts both sequences of a pair (x, y) = (z0, z0), and EDICT's denoising steps
(samplers/edict.py, eqs. 14-15) are undone one by one up the grid: un-mix, then the two affine
half-steps in reverse order, each with the noise predicted from the other sequence. As the
reference runs it (cure-lab/PnPInversion `run_editing_edict.py` -> `models/edict/edict_functions.py`
`EDICT_editing`): its own grid 980, 960, ..., 0 (no steps_offset, float64 alpha-bars), of which the
last int(50 x 0.8) = 40 points, 780 .. 0, are used (strength 0.8); mixing p = 0.93; the update
order alternates per step (leapfrog); guidance 3 over E("") and E(prompt); everything in float64,
the UNet included (`--edict-dtype float32` runs in the model's float32 instead).

The result is the pair at timestep 780: the trajectory holds x after each inversion step (z0
first), `partner` holds y. Only EDICT's sampler can denoise the pair, so the method declares it as
its sampler (`edict_denoise`), and it edits with `--control none` (the reference's
"direct_forward": the pair re-denoised under the target prompt, no attention control).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from inversion.method import InversionMethod, InversionTask
from ldm.errors import UsageError
from ldm.model import StableDiffusion
from samplers.edict import Coupling, active_timesteps, edict_denoise, invert_pair
from samplers.inversion import Inversion, InversionCost
from samplers.noise import predict_guided, unet_dtype
from samplers.schedule import Schedule
from samplers.settings import Alias, Settings, setting

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class EdictSettings(Settings):
    mix: float = setting(0.93, "mixing weight p of the coupled pair (higher: closer sequences)", flag="--edict-mix",
                         low=0.01, high=1.0)
    guidance: float = setting(3.0, "EDICT's own classifier-free guidance scale, for its inversion and its denoising "
                              "(the run's --guidance is not read)", flag="--edict-guidance")
    strength: float = setting(0.8, "fraction of EDICT's grid that is inverted and denoised again (0.8: timesteps "
                              "780 .. 0 of 980 .. 0)", flag="--edict-strength", low=0.0, high=1.0)
    dtype: str = setting("float64", "what the UNet and the pair compute in (float64: exact to about 1e-12, as the "
                         "reference runs it)", flag="--edict-dtype", choices=tuple(DTYPES))
    no_leapfrog: bool = setting(False, "update x then y at every step instead of alternating the order "
                                "(the reference's leapfrog_steps=False)", flag="--edict-no-leapfrog")


def invert_edict(sd: StableDiffusion, task: InversionTask, settings: EdictSettings = EdictSettings()) -> Inversion:
    grid = Schedule.edict(task.steps)
    timesteps = active_timesteps(grid, settings.strength)
    if not timesteps:
        raise UsageError(f"--edict-strength {settings.strength:g} leaves none of the {task.steps} steps to invert")
    dtype = DTYPES[settings.dtype]
    coupling = Coupling(settings.mix, not settings.no_leapfrog)
    null, prompt = task.null.to(dtype), task.prompt.to(dtype)
    x = task.z0.to(dtype)
    y = x.clone()
    trajectory = [x]
    with unet_dtype(sd, dtype), torch.no_grad():
        def eps(latent: torch.Tensor, t: int) -> torch.Tensor:
            return predict_guided(sd, latent, t, null, prompt, settings.guidance)

        # denoising step k of the active grid is undone in the order k = n-1 .. 0 (timesteps 0 .. 780)
        for k in tqdm(reversed(range(len(timesteps))), total=len(timesteps), desc="EDICT inversion",
                      disable=not task.progress, leave=False):
            x, y = invert_pair(x, y, k, timesteps[k], eps, grid, coupling)
            trajectory.append(x)
    recorded = {**settings.as_dict(), "leapfrog": coupling.leapfrog, "steps": task.steps}
    # per step two half-updates, each a CFG pair of rows
    cost = InversionCost(unet_rows=4 * len(timesteps))
    return Inversion("edict", tuple(trajectory), partner=y, settings=recorded, cost=cost)


METHOD = InversionMethod(
    name="edict",
    summary="EDICT: exact inversion of a coupled latent pair (float64, its own 780..0 grid, guidance 3); "
            "edits with --control none only",
    settings=EdictSettings,
    invert=invert_edict,
    aliases=(Alias("edict-inversion"),),
    ddim_trajectory=False,
    sampler=edict_denoise,
    edits=("none",),
)
