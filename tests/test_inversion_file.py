"""Inversion files (evaluation/inversion_file.py, docs/methods/inversion-files.md): what a file
holds, the round trip of a method's state, and the one-line refusals of a file that does not fit
the run (steps, image size, prompt, guidance, method, a damaged or foreign file)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cli
from tests.oracle_fixtures import ORACLE

IMAGE = str(ORACLE / "input.png")
SRC, TGT = "a round cake on a plate", "a square cake on a plate"
COMMON = ["--model", "tiny-random", "--image", IMAGE, "--size", "64", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def null_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inv") / "cake.safetensors"
    assert cli.main(["invert", *COMMON, "--prompt", SRC, "--inversion", "null-text", "--nti-inner-steps", "2",
                     "-o", str(path)]) == 0
    return path


def test_the_file_holds_the_trajectory_the_state_and_the_metadata(null_text_file):
    with safe_open(str(null_text_file), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        trajectory, nulls = f.get_tensor("trajectory"), f.get_tensor("null_embeddings")
    assert keys == {"trajectory", "null_embeddings"}
    assert trajectory.shape == (3, 1, 4, 8, 8) and trajectory.dtype == torch.float32  # z0, z1, z_T
    assert nulls.shape == (2, 1, 77, 32)
    assert meta["method"] == "null-text" and meta["prompt"] == SRC and meta["steps"] == "2"
    assert float(meta["guidance"]) == 7.5 and json.loads(meta["settings"])["inner_steps"] == 2
    assert len(meta["image_sha256"]) == 64 and meta["image_size"] == "64x64"


def edit_from(path, tmp_path, *extra):
    return cli.main(["edit", *COMMON, "--source", SRC, "--target", TGT, "--inversion-file", str(path),
                     "-o", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("extra,message", [
    (["--steps", "3"], "has 2 steps, this run 3"),
    (["--size", "128"], "holds latents (1, 4, 8, 8), the image gives (1, 4, 16, 16)"),
    (["--source", "a round pie on a plate"], "was inverted with the prompt 'a round cake on a plate'"),
    (["--guidance", "5"], "was made for guidance 7.5; this run uses --guidance 5"),
])
def test_a_file_that_does_not_fit_the_run_is_one_line_and_writes_nothing(null_text_file, tmp_path, capsys, extra, message):
    assert edit_from(null_text_file, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_a_method_that_cannot_start_from_the_file_is_refused(null_text_file, tmp_path, capsys):
    with safe_open(str(null_text_file), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign), metadata={**meta, "method": "mystery"})
    assert edit_from(foreign, tmp_path / "x", "--inversion", "direct") == 2
    assert "holds a mystery inversion; --inversion direct cannot start from it" in capsys.readouterr().err


def test_a_damaged_or_foreign_file_is_one_line(tmp_path, capsys):
    not_safetensors = tmp_path / "junk.safetensors"
    not_safetensors.write_bytes(b"definitely not a safetensors file")
    no_trajectory = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(2, 2)}, str(no_trajectory))
    for path, message in ((not_safetensors, "safetensors"), (no_trajectory, "no `trajectory` tensor"),
                          (tmp_path / "missing.safetensors", "no such file")):
        assert edit_from(path, tmp_path / "o") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_the_restored_state_is_the_saved_state(null_text_file, tmp_path):
    """Editing from the file uses the file's null embeddings, not a new optimisation: the edit's
    inversion cost is zero UNet rows."""
    assert edit_from(null_text_file, tmp_path, "--save-latents") == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["inversion"]["method"] == "null-text" and run["inversion"]["from_file"] == str(null_text_file)
    assert run["metrics"]["unet_rows"] == {"edit": 2 * 4, "total": 2 * 4}  # no inversion pass at all


@pytest.mark.parametrize("options", [
    ["--inversion", "spdinv", "--spd-rounds", "2"],
    ["--inversion", "edit-friendly", "--ef-skip", "1"],
], ids=["spdinv", "edit-friendly"])
def test_a_file_of_a_method_with_its_own_trajectory_edits_like_inverting_in_the_same_run(tmp_path, options):
    """SPDInv's optimised trajectory and null embeddings, edit-friendly's noised latents and noise
    maps: `invert` then `edit --inversion-file` lands on the latents of one `edit` that inverts
    itself (both at --steps 3), and the edit from the file runs no inversion pass."""
    import numpy as np

    common = [*COMMON[:-3], "--steps", "3", "--no-progress"]
    path = tmp_path / "inv.safetensors"
    assert cli.main(["invert", *common, "--prompt", SRC, *options, "-o", str(path)]) == 0
    edit = ["edit", *common, "--source", SRC, "--target", TGT, "--save-latents"]
    assert cli.main([*edit, *options, "-o", str(tmp_path / "once")]) == 0
    assert cli.main([*edit, "--inversion-file", str(path), "-o", str(tmp_path / "file")]) == 0
    once = np.load(tmp_path / "once" / "latents" / "final.npy")
    from_file = np.load(tmp_path / "file" / "latents" / "final.npy")
    assert np.abs(from_file - once).max() <= 1e-5 * np.abs(once).max()
    run = json.loads((tmp_path / "file" / "run.json").read_text())
    assert run["inversion"]["method"] == options[1]
    assert set(run["metrics"]["unet_rows"]) == {"edit", "total"}  # no inversion stage
