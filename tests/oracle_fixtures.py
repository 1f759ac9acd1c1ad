"""Session-scoped fixtures for the reference-oracle tests: the tiny-sd pipeline the reference ran
on (tests/data/tiny-sd, converted with weights.convert), its input image, prompts and inversions of
it, computed once per test session and shared by every oracle test (inversion/reconstruction here,
edits in the controllers' tests).

Why the inversions start from the *reference's* DDIM trajectory: ours equals it to relative RMS
3e-5 (tests/test_inversion_oracle.py), but a 50-step guidance-7.5 loop on this random model
amplifies such a difference about 1000-fold (z_T off by 3e-5 -> DDIM reconstruction off by 3.6e-2,
from the reference's own z_T: 1.5e-3). Starting from the reference's trajectory checks each stage
against the reference instead of measuring that amplification.

tests/conftest.py star-imports this module, so any test can ask for
  oracle_sd            StableDiffusion loaded from the converted tiny-sd
  oracle_image         (512, 512, 3) uint8, our load_image of oracle input.png
  oracle_z0            (1, 4, 64, 64) our VAE latent of it
  oracle_embeddings    {"null": E(""), "source": E(SOURCE), "target": E(TARGET)}, each (1, 77, 32)
  oracle_trajectory    the reference's DDIM inversion L[0..50], each (1, 4, 64, 64)
  oracle_inversions    lazy cache, 50 steps, guidance 7.5, all on oracle_trajectory:
                       ["ddim"], ["direct"] (fused), ["direct-offset"] (the reference's form,
                       offsets recorded in the edit batch [E(""), E(""), E(src), E(tgt)]), ["negative-prompt"],
                       ["null-text-reference"] (the reference's own per-step null embeddings,
                       free), ["null-text"] (our full optimisation: minutes, only when asked for)
and call oracle_array("ddim+p2p/blend-none/reconstruct_latent.npy") / rel_rms(ours, ref).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from evaluation.images import encode, load_image
from inversion.ddim import invert_ddim
from inversion.direct import DirectSettings, invert_direct
from inversion.method import InversionTask
from inversion.negative_prompt import invert_negative_prompt
from inversion.null_text import invert_null_text
from ldm.model import StableDiffusion
from samplers.inversion import Inversion
from samplers.schedule import Schedule

ORACLE = Path(__file__).parent / "data" / "oracle"
TINY_SD = Path(__file__).parent / "data" / "tiny-sd"
SOURCE = "a round cake with orange frosting on a wooden plate"
TARGET = "a square cake with orange frosting on a wooden plate"
STEPS = 50
GUIDANCE = 7.5
NULL_EMBEDDINGS = "null-text-inversion+p2p/blend-cake-cake/uncond_embeddings.npy"  # (50, 1, 77, 32)


def oracle_array(relpath: str) -> np.ndarray:
    return np.load(ORACLE / relpath)


def rel_rms(ours: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """RMS(ours - ref) / RMS(ref): the README's measure of agreement."""
    a = np.asarray(ours.detach().cpu() if isinstance(ours, torch.Tensor) else ours, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64).reshape(a.shape)
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


@pytest.fixture(scope="session")
def oracle_sd(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusion:
    from weights.convert import convert

    out = convert(TINY_SD, tmp_path_factory.mktemp("oracle") / "tiny-sd")
    return StableDiffusion.load(out)


@pytest.fixture(scope="session")
def oracle_image() -> np.ndarray:
    return load_image(ORACLE / "input.png")


@pytest.fixture(scope="session")
def oracle_z0(oracle_sd: StableDiffusion, oracle_image: np.ndarray) -> torch.Tensor:
    return encode(oracle_sd, oracle_image)


@pytest.fixture(scope="session")
def oracle_embeddings(oracle_sd: StableDiffusion) -> dict[str, torch.Tensor]:
    null, src, tgt = oracle_sd.embed(["", SOURCE, TARGET]).split(1)
    return {"null": null, "source": src, "target": tgt}


@pytest.fixture(scope="session")
def oracle_trajectory() -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in oracle_array("p2p_inverted_trajectory.npy")]


def oracle_task(emb: dict[str, torch.Tensor], trajectory: tuple[torch.Tensor, ...], prompt: str = "source") -> InversionTask:
    """The inversion inputs of the oracle edit (50 steps, guidance 7.5, offsets recorded in the edit's
    batch) on a given trajectory (the reference's, so no DDIM pass runs)."""
    return InversionTask(z0=trajectory[0], prompt=emb[prompt], null=emb["null"], schedule=Schedule(STEPS),
                         guidance=GUIDANCE, target=emb["target"], trajectory=trajectory)


class LazyInversions:
    """method name -> Inversion of the oracle image on the reference trajectory, computed on first use."""

    def __init__(self, sd: StableDiffusion, trajectory: list[torch.Tensor], emb: dict[str, torch.Tensor]) -> None:
        self.sd, self.trajectory, self.emb = sd, trajectory, emb
        self.cache: dict[str, Inversion] = {}

    def __getitem__(self, method: str) -> Inversion:
        if method not in self.cache:
            self.cache[method] = self._compute(method)
        return self.cache[method]

    def _compute(self, method: str) -> Inversion:
        sd, t = self.sd, tuple(self.trajectory)
        task = oracle_task(self.emb, t)
        runs: dict[str, Callable[[], Inversion]] = {
            "ddim": lambda: invert_ddim(sd, task),
            "direct": lambda: invert_direct(sd, task),
            "direct-offset": lambda: invert_direct(sd, task, DirectSettings(form="offset")),
            "negative-prompt": lambda: invert_negative_prompt(sd, task),
            "null-text": lambda: invert_null_text(sd, task),
            "null-text-reference": lambda: Inversion(
                "null-text", t, null_embeddings=tuple(torch.from_numpy(a) for a in oracle_array(NULL_EMBEDDINGS))
            ),
        }
        if method not in runs:
            raise KeyError(f"no oracle inversion {method!r}; choose from {', '.join(runs)}")
        return runs[method]()


@pytest.fixture(scope="session")
def oracle_inversions(
    oracle_sd: StableDiffusion, oracle_trajectory: list[torch.Tensor], oracle_embeddings: dict[str, torch.Tensor]
) -> LazyInversions:
    return LazyInversions(oracle_sd, oracle_trajectory, oracle_embeddings)
