"""The editing API and `invedit edit` end to end on tiny-random, its refusals, and P2P's identity property.

- target prompt == source prompt under P2P reproduces the source branch with ddim, negative-prompt
  and null-text inversion (both branches see the same latents, embeddings and, from the
  controller, the same maps); not with DirectInversion, whose target row is uncorrected by design.
- bad input (blend word absent, replace prompts of different word counts, a prompt over 75 tokens,
  unknown method names) gives one line on stderr, exit code 2, and writes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from evaluation.api import edit
from evaluation.images import load_image
from evaluation.registry import Registry
from ldm.model import StableDiffusion

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = Registry()
SRC = "a round cake with orange frosting on a wooden plate"
TGT = "a square cake with orange frosting on a wooden plate"


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return StableDiffusion.tiny_random(seed=0)


@pytest.mark.parametrize("inversion", ["ddim", "negative-prompt", "null-text"])
def test_p2p_with_target_equal_to_source_reproduces_the_source_branch(sd, image_path, inversion):
    image = load_image(image_path, 128)
    # LocalBlend on, but no reweighting (a reweighted target is a different edit)
    spec = REGISTRY.edit_spec(inversion=inversion, method="p2p", source=SRC, target=SRC, steps=4,
                              blend=("cake", "cake"), reweight={})
    result = edit(sd, image, spec)
    out = result.latents
    assert len(result.sites) > 0
    assert float((out[1] - out[0]).norm() / out[0].norm()) < 1e-5


def test_p2p_edit_changes_the_target(sd, image_path):
    image = load_image(image_path, 128)
    edits = {}
    for control in ("p2p", "none"):
        spec = REGISTRY.edit_spec(inversion="direct", method=control, source=SRC, target=TGT, steps=4)
        edits[control] = edit(sd, image, spec).latents
    assert torch.equal(edits["p2p"][0], edits["none"][0])  # the source branch is not edited
    assert float((edits["p2p"][1] - edits["none"][1]).norm() / edits["none"][1].norm()) > 1e-3


IDLE = {"masactrl": {"start_step": 6}, "pnp": {"features": 0.0, "attention": 0.0},
        "p2p-replace": {"cross": 0.0, "self_": 0.0}, "proximal-guidance": {"prox": None}}
SITES = {"masactrl": 1, "pnp": 5 + 1, "p2p-replace": 11 + 11, "p2p": 11 + 11}  # tiny: 11 blocks, 6 up


SITES["proximal-guidance"] = SITES["p2p"]


@pytest.mark.parametrize("control,inversion", [
    ("masactrl", "ddim"), ("masactrl", "direct"), ("pnp", "direct"), ("pnp", "ddim"),
    ("p2p-replace", "direct"), ("proximal-guidance", "negative-prompt"),
])
def test_each_method_changes_the_target_and_reports_its_sites(sd, image_path, control, inversion):
    """Against the same run with the method's edit switched off (same rows, same inversion)."""
    image = load_image(image_path, 128)
    result = edit(sd, image, REGISTRY.edit_spec(inversion=inversion, method=control, source=SRC, target=TGT, steps=6))
    edited = result.latents
    idle_spec = REGISTRY.edit_spec(inversion=inversion, method=control, source=SRC, target=TGT, steps=6,
                                   allow_idle=True, **IDLE[control])
    idle = edit(sd, image, idle_spec).latents
    assert float((edited[1] - idle[1]).norm() / idle[1].norm()) > 1e-4
    assert torch.equal(edited[0], idle[0])  # the source branch is never edited
    assert len(result.sites) == SITES[control]


def test_edit_command_writes_every_output(image_path, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "cli.py", "edit", "--model", "tiny-random", "--image", str(image_path), "--size", "128",
           "--steps", "3", "--source", "a [round] cake on a plate", "--target", "a square cake on a plate",
           "--inversion", "ddim", "--control", "p2p", "--blend", "cake cake", "-o", str(out), "--save-latents",
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("edited.png", "grid.png", "attention.png", "run.json"):
        assert (out / name).is_file(), name
    assert np.load(out / "latents" / "final.npy").shape == (2, 4, 16, 16)
    assert np.load(out / "latents" / "trajectory.npy").shape == (4, 1, 4, 16, 16)
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["source"] == "a round cake on a plate"  # brackets removed
    assert run["spec"]["method_settings"]["blend"] == ["cake", "cake"]
    assert run["metrics"]["unet_rows"] == {"inversion": 3, "edit": 12, "total": 15}
    assert run["image"]["width"] == 128 and len(run["image"]["sha256"]) == 64
    assert run["metrics"]["sites_touched"] > 0
    assert {"invert", "edit", "decode", "total"} <= set(run["timings_s"])
    assert "torch" in run["versions"]
    assert not list(out.rglob("*.tmp"))


BAD = {
    "blend word absent": (["--blend", "pie cake"], "'pie'"),
    "cross-replace word absent": (["--cross-word", "pie=0.2:0.6"], "'pie'"),
    "replace word counts differ": (["--control", "p2p-replace", "--target", "a big square cake on a plate"],
                                   "same number of words"),
    "prompt over 75 tokens": (["--target", " ".join(["cake"] * 76)], "76 tokens"),
    "unknown inversion": (["--inversion", "edict2"], "unknown inversion"),
    "unknown control": (["--control", "p2p-magic"], "unknown editing method"),
    "option of another method": (["--control", "masactrl", "--blend", "cake cake"], "--blend is an option of p2p"),
    "pnp with null-text": (["--control", "pnp", "--inversion", "null-text"], "works with --inversion ddim or direct"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(image_path, tmp_path, capsys, case):
    extra, message = BAD[case]
    out = tmp_path / "out"
    argv = ["edit", "--model", "tiny-random", "--image", str(image_path), "--size", "128", "--steps", "2",
            "--source", "a round cake on a plate", "--target", "a square cake on a plate", "-o", str(out),
            "--no-progress"]
    # later options win in argparse, so the case's --target / --control replace the defaults above
    code = cli.main(argv + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not any(tmp_path.iterdir())  # no output, no staging folder
