"""StyleDiffusion (inversion/stylediffusion.py, control/stylediffusion.py) on the tiny random model
with a tiny random CLIP vision tower built here from a transformers config.

- the CLIP image tokens are transformers' own vision outputs after its final LayerNorm;
- the rounds schedule is the reference's numpy formula; the mapping loss falls within every step;
- with the trained mappings and no edit, the reconstruction is closer to the input latent than
  DDIM's at guidance 7.5, and the edit's source branch is that reconstruction;
- the value schedule of the edit, the reference's mapper rule, the unconditional self replacement
  against softmax written here;
- no parameter gets a gradient, a second edit gives the same result, the inversion round-trips
  through an inversion file (no retraining), run.json has the training cost, and a missing CLIP
  model is one line naming --clip-vision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

import cli
from control.base import StepWindow
from control.p2p import AttentionReweight, PromptToPrompt
from control.stylediffusion import StyleDiffusionP2PSettings, UncondSelfReplace, modulated_steps, uses_replace
from evaluation.api import InversionSpec, edit, reconstruct
from evaluation.images import load_image, to_tensor
from evaluation.registry import Registry
from inversion import ddim, stylediffusion
from inversion.image_tokens import ImageTokens, load_image_tokens
from inversion.stylediffusion import StyleDiffusionSettings, rounds_schedule
from ldm.context import AttnContext, AttnSite, BatchLayout, RunInfo
from ldm.errors import WeightsError
from ldm.model import StableDiffusion
from tests.determinism import one_thread
from tests.oracle_fixtures import ORACLE

SRC = "a round cake with orange frosting on a wooden plate"
TGT = "a square cake with orange frosting on a wooden plate"
STEPS, ROUNDS = 4, 5
REGISTRY = Registry()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random CLIP ViT as wide as the tiny UNet's context (32), 32 px input, 8 px patches: 17 tokens."""
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return StableDiffusion.tiny_random(seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return load_image(ORACLE / "input.png", 64)


def settings(clip_dir: Path, **values) -> StyleDiffusionSettings:
    return StyleDiffusionSettings(inner_steps=ROUNDS, early_stop=0.0, clip_vision=str(clip_dir), **values)


@pytest.fixture(scope="module")
def trained(sd, image, clip_dir):
    """One StyleDiffusion inversion (every round run: no early stop) and its reconstruction."""
    spec = InversionSpec(SRC, stylediffusion.METHOD, settings(clip_dir), steps=STEPS)
    return reconstruct(sd, image, spec)


def test_clip_tokens_are_the_vision_towers_outputs_after_its_final_layernorm(clip_dir) -> None:
    tokens = load_image_tokens(str(clip_dir))
    photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the tower's own size: no resize
    got = tokens(to_tensor(photo))
    model = CLIPVisionModel.from_pretrained(clip_dir)
    processor = CLIPImageProcessor(do_resize=False, do_center_crop=False)  # rescale 1/255, CLIP mean and std
    with torch.no_grad():
        out = model(**processor(images=photo, return_tensors="pt"))
    assert got.shape == (1, 17, 32)
    torch.testing.assert_close(got[:, 0], out.pooler_output, rtol=1e-4, atol=1e-5)  # the class token, pooled
    assert not any(p.requires_grad for p in tokens.model.parameters())
    wide = tokens.model.config.image_size
    assert ImageTokens(tokens.model).size == wide and tokens(to_tensor(np.zeros((64, 96, 3), np.uint8))).shape == got.shape


def test_the_rounds_schedule_is_the_references() -> None:
    plan = rounds_schedule(100, 0.1, 50)
    want = np.ceil(100 * np.exp(-0.1 * np.linspace(0, 49, 50))).astype(int)
    assert plan == tuple(want) and plan[:3] == (100, 91, 82) and sum(plan) == 1071


def test_the_mapping_loss_falls_within_every_step(trained) -> None:
    inv = trained.inversion
    assert inv.cost.rounds_per_step == rounds_schedule(ROUNDS, 0.1, STEPS)  # no early stop asked for
    for i, losses in enumerate(inv.losses):
        assert losses[-1] < losses[0], (i, losses)
    cost = inv.cost.as_dict()
    assert cost["unet_rows_backward"] == sum(inv.cost.rounds_per_step) and cost["seconds"] > 0
    # DDIM pass, then per step: A*, eps_u, the rounds, the final eps_c
    assert cost["unet_rows"] == STEPS + sum(3 + r for r in inv.cost.rounds_per_step)


def test_the_trained_reconstruction_is_closer_to_the_input_than_ddims(sd, image, trained) -> None:
    plain = reconstruct(sd, image, InversionSpec(SRC, ddim.METHOD, ddim.DDIMSettings(), steps=STEPS, guidance=7.5))
    ours = float((trained.latent - trained.z0).norm())
    theirs = float((plain.latent - plain.z0).norm())
    assert ours < 0.8 * theirs, (ours, theirs)


def test_the_edits_source_branch_is_the_reconstruction_and_its_target_keeps_the_values_for_tau_v(
        sd, image, trained) -> None:
    spec = REGISTRY.edit_spec("stylediffusion+p2p", source=SRC, target=SRC, steps=STEPS)
    result = edit(sd, image, spec, inversion=trained.inversion)
    torch.testing.assert_close(result.latents[0:1], trained.latent, rtol=1e-4, atol=1e-4)
    # target = source: the branches differ only by the target's own values after tau_v
    assert not torch.allclose(result.latents[1], result.latents[0], atol=1e-4)
    full = edit(sd, image, REGISTRY.edit_spec("stylediffusion+p2p", source=SRC, target=SRC, steps=STEPS, value=1.0),
                inversion=trained.inversion)
    # with tau_v = 1 they are the same computation (P2P's explicit maps round unlike the fused kernel)
    assert float((full.latents[1] - full.latents[0]).norm() / full.latents[0].norm()) < 1e-5


def test_the_value_schedule_and_the_mapper_rule_are_the_references() -> None:
    assert [modulated_steps(f, 50) for f in (0.5, 0.6, 1.0, 0.0)] == [25, 30, 50, 0]
    assert modulated_steps(0.55, 6) == 4  # i < 3.3
    auto = StyleDiffusionP2PSettings()
    assert not uses_replace(auto, SRC, TGT)  # "round" and "square": different lengths
    assert uses_replace(auto, "a black cat", "a white cat")  # as many characters and words
    assert not uses_replace(auto, "a black cat", "a whitecat!")  # as many characters, fewer words
    assert uses_replace(StyleDiffusionP2PSettings(mapper="replace"), SRC, TGT)


def test_unconditional_self_replacement_equals_softmax_written_here(sd) -> None:
    """Rows [u_src, u_tgt, c_src, c_tgt]: u_tgt attends with u_src's Q, K; c_tgt too while P2P's window is open."""
    p2p = PromptToPrompt(AttentionReweight(torch.ones(77)), torch.zeros(5, 77), StepWindow(0, 2))  # F = A_src
    controller = UncondSelfReplace(StepWindow(0, 3), p2p)
    layout = BatchLayout.cfg()
    run = RunInfo(layout, 4, torch.device("cpu"), (8, 8))
    p2p.start(run)
    controller.start(run)
    site = AttnSite(3, "down", 1, "self", 2, 8, "x")
    q, k, v = (torch.randn(4, 2, 16, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))

    def attention(qq, kk, vv):
        return (qq @ kk.transpose(-1, -2) * 8 ** -0.5).softmax(-1) @ vv

    for step, cond_too in ((0, True), (2, False)):
        out = controller.attend(q, k, v, site, AttnContext(step, 1, 4, layout))
        torch.testing.assert_close(out[1], attention(q[0], k[0], v[1]))
        torch.testing.assert_close(out[3], attention(q[2], k[2], v[3]) if cond_too else attention(q[3], k[3], v[3]))
        torch.testing.assert_close(out[0], attention(q[0], k[0], v[0]))
    assert controller.attend(q, k, v, site, AttnContext(3, 1, 4, layout)) is None  # window over
    assert controller.attend(q, k, v, AttnSite(3, "down", 0, "self", 2, 8, "x"), AttnContext(0, 1, 4, layout)) is None


def test_no_gradient_reaches_a_parameter_and_a_second_edit_gives_the_same_result(sd, image, clip_dir) -> None:
    spec = REGISTRY.edit_spec("stylediffusion+p2p", source=SRC, target=TGT, steps=3, inner_steps=2,
                              clip_vision=str(clip_dir))
    with one_thread():  # the property is that no state leaks, not the summation order of two threads
        first, second = edit(sd, image, spec), edit(sd, image, spec)
    assert torch.equal(first.latents, second.latents)
    assert all(p.grad is None for p in sd.parameters())
    assert first.inversion.cost.rounds_per_step == second.inversion.cost.rounds_per_step


def test_the_command_line_round_trips_the_inversion_and_records_the_training_cost(image, clip_dir, tmp_path) -> None:
    path, saved = ORACLE / "input.png", tmp_path / "inv.safetensors"
    base = ["edit", "--model", "tiny-random", "--image", str(path), "--size", "64", "--steps", "3", "--source", SRC,
            "--target", TGT, "--no-progress"]
    assert cli.main(base + ["--method", "stylediffusion+p2p", "--clip-vision", str(clip_dir), "--sd-inner-steps", "2",
                            "--save-inversion", str(saved), "-o", str(tmp_path / "a")]) == 0
    assert cli.main(base + ["--inversion-file", str(saved), "--control", "stylediffusion-p2p", "-o", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "run.json").read_text()) for d in "ab")
    cost = a["inversion"]["cost"]
    assert cost["rounds_per_step"] == [2, 2, 2] and cost["unet_rows_backward"] == 6 and cost["seconds"] > 0
    assert a["spec"]["method"] == "stylediffusion-p2p" and a["spec"]["inversion"] == "stylediffusion"
    assert b["inversion"]["cost"]["unet_rows"] == 0  # restored from the file, not trained again
    assert (tmp_path / "a" / "edited.png").read_bytes() == (tmp_path / "b" / "edited.png").read_bytes()


def test_a_missing_clip_model_is_one_line_naming_the_option(tmp_path, capsys) -> None:
    argv = ["edit", "--model", "tiny-random", "--image", str(ORACLE / "input.png"), "--size", "64", "--steps", "2",
            "--source", SRC, "--target", TGT, "--method", "stylediffusion+p2p", "--clip-vision", str(tmp_path / "nope"),
            "--no-progress", "-o", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--clip-vision" in err and "nope" in err, err
    with pytest.raises(WeightsError, match="--clip-vision"):
        load_image_tokens(str(tmp_path))  # a folder, but no model in it
    assert not (tmp_path / "out").exists()
