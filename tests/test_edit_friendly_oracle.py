"""Edit-friendly DDPM inversion + P2P against the reference code's own outputs on tiny-sd
(tests/data/oracle/edit-friendly-inversion+p2p: PnP Inversion's run_editing_edit_friendly_p2p.py
unchanged; eta 1, skip 12, guidance [1, 7.5], AttentionReplace since the prompts have equal word
counts, setup_seed(1234) before the image).

From the reference's own VAE latent and our seeded draws (which equal the reference's draws bit for
bit: the closed form of the noised latents checks them), the noised latents and noise maps match the
reference's, and the edit through the editing API (`edit-friendly-inversion+p2p`, the code path of
`invedit edit`) reproduces both final rows. The arrays are stored slim: the noised latents and the
maps of the 38 steps the edit runs in float16 (relative error 2e-4, far below the tolerance).
Measured: noised latents 1.1e-7, maps 3.6e-7, final source row 1.8e-6, target 1.4e-5 (relative RMS);
the README's tolerance is 1e-2 per row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.api import edit
from evaluation.registry import Registry
from inversion.edit_friendly import invert_edit_friendly
from inversion.method import InversionTask
from samplers.schedule import Schedule
from tests.oracle_fixtures import oracle_array, rel_rms

pytestmark = pytest.mark.slow

DIR = "edit-friendly-inversion+p2p"
SKIP = 12


@pytest.fixture(scope="module")
def ef(oracle_sd, oracle_embeddings):
    z0 = torch.from_numpy(oracle_array(f"{DIR}/vae_latent.npy"))  # (1, 4, 64, 64), the reference's own
    task = InversionTask(z0, oracle_embeddings["source"], oracle_embeddings["null"], Schedule(50), seed=1234)
    return invert_edit_friendly(oracle_sd, task)


def test_noised_latents_and_noise_maps_match_the_reference(ef) -> None:
    wts = oracle_array(f"{DIR}/wts_fp16.npy").astype(np.float32)  # (51, 4, 64, 64), index 0 = z0
    zs = oracle_array(f"{DIR}/zs_fp16.npy").astype(np.float32)  # (38, 4, 64, 64): zs[idx], idx = 49 - step
    assert ef.start == SKIP and len(ef.noise.maps) == 50 - SKIP
    worst = max(rel_rms(ef.trajectory[k], wts[k]) for k in range(51))
    assert worst < 1e-3, worst  # measured 1.1e-7 against the float32 arrays
    maps = max(rel_rms(ef.noise.maps[i - SKIP], zs[49 - i]) for i in range(SKIP, 49))
    assert maps < 1e-3, maps  # measured 3.6e-7
    assert not ef.noise.maps[-1].any() and not zs[0].any()  # the last step adds no noise


def test_edit_reproduces_the_reference_final_latents(oracle_sd, oracle_image, ef) -> None:
    from tests.oracle_fixtures import SOURCE, TARGET

    spec = Registry().edit_spec("edit-friendly-inversion+p2p", source=SOURCE, target=TARGET)
    result = edit(oracle_sd, oracle_image, spec, inversion=ef)
    ref = oracle_array(f"{DIR}/final_latents.npy")  # (2, 4, 64, 64): source row, target row
    errors = [rel_rms(result.latents[r], ref[r]) for r in range(2)]
    assert max(errors) < 1e-2, errors  # measured 1.8e-6 and 1.4e-5
    assert result.unet_rows["edit"] == 4 * (50 - SKIP)
    # the source branch ends at the last step's mean, not at z0, as the reference's (0.042 rms)
    assert abs(float((result.latents[0] - ef.z0[0]).pow(2).mean().sqrt()) - 0.0421) < 2e-3
