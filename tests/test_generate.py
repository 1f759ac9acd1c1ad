"""`invedit generate` makes what diffusers' StableDiffusionPipeline with a DDIMScheduler makes from
the same start latents and prompts (the oracle), square and non-square, and refuses bad input
with one line and exit code 2 like every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from evaluation.generation import generate, start_noise
from ldm.model import StableDiffusion

diffusers = pytest.importorskip("diffusers")

TINY_SD = Path(__file__).parent / "data" / "tiny-sd"
PROMPT, NEGATIVE = "a round cake with orange frosting on a wooden plate", "blurry, dark"
STEPS = 5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our model converted from tests/data/tiny-sd, and diffusers' pipeline on the folder itself."""
    from weights.convert import convert

    ours = StableDiffusion.load(convert(TINY_SD, tmp_path_factory.mktemp("gen") / "tiny-sd"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return ours, pipe


@pytest.mark.parametrize("size", [(64, 64), (128, 64)], ids=["square", "non-square"])
def test_generate_equals_the_diffusers_pipeline(pair, size):
    ours, pipe = pair
    z_T = start_noise(7, 2, size)  # (2, 4, h, w), width 128 -> w 16
    assert z_T.shape == (2, 4, size[1] // 8, size[0] // 8)
    result = generate(ours, PROMPT, z_T, negative=NEGATIVE, steps=STEPS, guidance=7.5)
    with torch.no_grad():  # one image per call, as ours (a batch of 4 rounds differently from one of 2)
        expected = torch.cat([pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                                   eta=0.0, latents=z_T[k : k + 1].clone(), height=size[1], width=size[0],
                                   output_type="latent").images for k in range(2)])
    assert result.latents.shape == expected.shape
    # the network parity tolerance of tests/test_networks.py
    assert (result.latents - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert result.unet_rows == 2 * 2 * STEPS
    assert result.images.shape == (2, size[1], size[0], 3)


def test_start_noise_is_the_pipelines_draw():
    """The pipeline draws its start latents with randn from the generator; so does start_noise."""
    g = torch.Generator().manual_seed(3)
    expected = diffusers.utils.torch_utils.randn_tensor((2, 4, 8, 16), generator=g, dtype=torch.float32)
    assert torch.equal(start_noise(3, 2, (128, 64)), expected)


def test_generate_command_writes_images_grid_and_run_json(tmp_path):
    out = tmp_path / "gen"
    code = cli.main(["generate", "--model", "tiny-random", "--prompt", "a cat", "--negative", "a dog", "--size", "128x64",
                     "--steps", "3", "--num-images", "2", "--seed", "5", "--dtype", "fp32", "--no-progress", "-o", str(out)])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "image-01.png", "image-02.png", "run.json"]
    assert Image.open(out / "image-01.png").size == (128, 64)
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "generate" and record["metrics"]["unet_rows"] == 12
    assert record["model"]["dtype"] == "torch.float32"
    # the same seed draws the same images
    again = tmp_path / "again"
    assert cli.main(["generate", "--model", "tiny-random", "--prompt", "a cat", "--negative", "a dog", "--size", "128x64",
                     "--steps", "3", "--num-images", "2", "--seed", "5", "--dtype", "fp32", "--no-progress",
                     "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "image-02.png")), np.asarray(Image.open(again / "image-02.png")))


@pytest.mark.parametrize("extra,message", [
    (["--size", "100"], "multiples of 64"),
    (["--prompt", "cake " * 80], "tokens"),
    (["--negative", "cake " * 80], "--negative"),
    (["--num-images", "0"], "--num-images"),
    (["--steps", "0"], "--steps"),
], ids=["size", "prompt-length", "negative-length", "count", "steps"])
def test_generate_refuses_bad_input_in_one_line(tmp_path, capsys, extra, message):
    args = ["generate", "--model", "tiny-random", "--prompt", "a cat", "-o", str(tmp_path / "out"), *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_generate_refuses_an_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert cli.main(["generate", "--model", "tiny-random", "--prompt", "a cat", "-o", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().err
