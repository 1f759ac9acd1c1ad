"""The method registry: names and the reference's aliases resolve, options are generated from the
settings declarations, and a method defined entirely in this file (a new inversion and a new
controller) runs through the editing API and through the command-line dispatcher, registered on a
registry value without touching any other file or any global state."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import cli
from control.base import ControllerBase
from control.method import EditMethod, EditPlan, EditPrompts, Sampling
from evaluation.api import edit
from evaluation.registry import EDITS, INVERSIONS, Registry
from inversion.ddim import ddim_trajectory
from inversion.method import InversionMethod, InversionTask
from kernels.attention import fused_attention
from ldm.context import AttnContext, AttnSite, BatchLayout, Row
from ldm.errors import UsageError
from ldm.model import ModelFacts, StableDiffusion
from samplers.guidance import ClassifierFree
from samplers.inversion import Inversion, InversionCost
from samplers.settings import Alias, Settings, setting, setting_fields
from tests.oracle_fixtures import ORACLE


# ---------------------------------------------------------------- a new inversion, defined here


@dataclass(frozen=True)
class NoisySettings(Settings):
    scale: float = setting(0.5, "how far z_T is pushed towards the seeded noise", flag="--noisy-scale", low=0.0, high=1.0)


def invert_noisy(sd: StableDiffusion, task: InversionTask, settings: NoisySettings) -> Inversion:
    """DDIM inversion whose start latent is mixed with seeded noise (a toy, but a real method)."""
    trajectory = ddim_trajectory(sd, task)
    noise = torch.randn(trajectory[-1].shape, generator=torch.Generator().manual_seed(task.seed))
    z_T = (1 - settings.scale) * trajectory[-1] + settings.scale * noise
    return Inversion("noisy", (*trajectory[:-1], z_T), settings=settings.as_dict(), cost=InversionCost(task.steps))


NOISY = InversionMethod("noisy", "DDIM inversion with a noisier start", NoisySettings, invert_noisy,
                        aliases=(Alias("noisy-inversion"),))


# ---------------------------------------------------------------- a new controller, defined here


class SharpenCross(ControllerBase):
    """Cross-attention of the target rows at a sharper temperature; everything else passes."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def attend(self, q, k, v, site: AttnSite, ctx: AttnContext):
        if site.kind != "cross":
            return None
        self._touch(site)
        out = fused_attention(q, k, v)
        sharp = fused_attention(q, k, v, scale=q.shape[-1] ** -0.5 / self.temperature)
        targets = ctx.layout.indices("target")
        return torch.stack([sharp[i] if i in targets else out[i] for i in range(q.shape[0])])


@dataclass(frozen=True)
class SharpenSettings(Settings):
    temperature: float = setting(0.5, "softmax temperature of the target's cross-attention", flag="--sharpen-t",
                                 low=0.05, high=10.0)


def plan_sharpen(facts: ModelFacts, prompts: EditPrompts, settings: SharpenSettings, sampling: Sampling) -> EditPlan:
    texts = {Row("source", "uncond"): "", Row("target", "uncond"): "",
             Row("source", "cond"): prompts.source, Row("target", "cond"): prompts.target}
    return EditPlan(BatchLayout.cfg(), texts, prompts.source, ClassifierFree(sampling.guidance),
                    (SharpenCross(settings.temperature),))


SHARPEN = EditMethod("sharpen", "sharper cross-attention for the target", SharpenSettings, plan_sharpen,
                     aliases=(Alias("sharp-cross", {"temperature": 0.25}),))
REGISTRY = Registry().with_inversion(NOISY).with_edit(SHARPEN)
SRC, TGT = "a round cake on a plate", "a square cake on a plate"


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    from evaluation.images import load_image

    return load_image(ORACLE / "input.png", 64)


def test_the_default_registry_holds_every_method_and_is_not_changed_by_adding_one():
    assert Registry().inversions == INVERSIONS and Registry().edits == EDITS
    assert {m.name for m in INVERSIONS} >= {"ddim", "direct", "negative-prompt", "null-text", "stylediffusion",
                                                 "pix2pix-zero-inversion"}
    assert {m.name for m in EDITS} >= {"p2p", "masactrl", "pnp", "none", "stylediffusion-p2p", "pix2pix-zero"}
    assert "noisy" not in {m.name for m in Registry().inversions}  # with_inversion returned a new value


@pytest.mark.parametrize("name,inversion,edit_name,implied", [
    ("directinversion+p2p", "direct", "p2p", {}),
    ("ddim+masactrl", "ddim", "masactrl", {}),
    ("null-text-inversion+proximal-guidance", "null-text", "p2p", {"prox": "l0"}),
    ("negative-prompt-inversion+proximal-guidance", "negative-prompt", "p2p", {"prox": "l0"}),
    ("directinversion+pnp", "direct", "pnp", {}),
    ("ddim+p2p-replace", "ddim", "p2p", {"replace": True}),
    ("stylediffusion+p2p", "stylediffusion", "stylediffusion-p2p", {}),
    ("ddim+pix2pix-zero", "pix2pix-zero-inversion", "pix2pix-zero", {}),
    ("directinversion+pix2pix-zero", "pix2pix-zero-inversion", "pix2pix-zero", {}),
])
def test_the_references_method_names_resolve(name, inversion, edit_name, implied):
    pair = Registry().pair(name)
    assert (pair.inversion.method.name, pair.edit.method.name) == (inversion, edit_name)
    assert dict(pair.edit.settings) == implied


def test_unknown_names_and_malformed_pairs_are_one_line_usage_errors():
    with pytest.raises(UsageError, match="unknown inversion 'edict2'.*ddim, direct"):
        Registry().pair("edict2+p2p")
    with pytest.raises(UsageError, match="INVERSION\\+EDIT"):
        Registry().pair("p2p")


def test_two_methods_cannot_declare_the_same_option():
    clash = EditMethod("clash", "declares --cross again", type("ClashSettings", (SharpenSettings,), {}), plan_sharpen)
    with pytest.raises(ValueError, match="--sharpen-t"):
        REGISTRY.with_edit(clash)


def test_every_registered_setting_has_help_a_flag_and_a_valid_default():
    for method in (*Registry().inversions, *Registry().edits):
        method.settings()  # the defaults pass the method's own checks
        for f in setting_fields(method.settings):
            assert f.info.help and f.flag.startswith("--"), (method.name, f.name)


def test_settings_out_of_range_are_refused_naming_the_flag():
    with pytest.raises(UsageError, match="--sharpen-t 20"):
        SharpenSettings(temperature=20.0)
    with pytest.raises(UsageError, match="--quantile 1.5"):
        Registry().edit_spec("ddim+p2p", source=SRC, target=TGT, quantile=1.5)
    with pytest.raises(UsageError, match="--cross 0.6:0.2: the window starts after it ends"):
        Registry().edit_spec("ddim+p2p", source=SRC, target=TGT, cross=(0.6, 0.2))
    with pytest.raises(UsageError, match="--pnp-features nan"):
        Registry().edit_spec("ddim+pnp", source=SRC, target=TGT, features=float("nan"))


def test_a_method_defined_in_a_test_runs_through_the_editing_api(image):
    tiny = StableDiffusion.tiny_random(seed=0)
    spec = REGISTRY.edit_spec("noisy-inversion+sharp-cross", source=SRC, target=TGT, steps=3)
    assert spec.inversion is NOISY and spec.method is SHARPEN and spec.method_settings.temperature == 0.25
    result = edit(tiny, image, spec)
    plain = edit(tiny, image, REGISTRY.edit_spec("noisy+none", source=SRC, target=TGT, steps=3))
    assert result.inversion.method == "noisy" and result.unet_rows == {"inversion": 3, "edit": 12, "total": 15}
    assert len(result.sites) == len([s for s in tiny.unet.attn_sites() if s.kind == "cross"])
    assert torch.equal(result.latents[0], plain.latents[0])  # the source branch is untouched
    assert not torch.allclose(result.latents[1], plain.latents[1])  # the target is edited


def test_a_method_defined_in_a_test_runs_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["edit", "--model", "tiny-random", "--image", str(ORACLE / "input.png"), "--size", "64", "--steps", "2",
            "--source", SRC, "--target", TGT, "--inversion", "noisy", "--noisy-scale", "0.25", "--control", "sharpen",
            "--sharpen-t", "0.4", "--no-progress", "-o", str(out)]
    assert cli.main(argv, registry=REGISTRY) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["inversion"] == "noisy" and run["spec"]["inversion_settings"] == {"scale": 0.25}
    assert run["spec"]["method"] == "sharpen" and run["spec"]["method_settings"] == {"temperature": 0.4}
    capsys.readouterr()
    assert cli.main(["edit", "--help"], registry=REGISTRY) == 0
    text = capsys.readouterr().out
    assert "--noisy-scale" in text and "--sharpen-t" in text and "(default: 0.5)" in text
    # the default registry knows neither
    assert cli.main(argv) == 2
    assert "unrecognized arguments: --noisy-scale 0.25 --sharpen-t 0.4" in capsys.readouterr().err
