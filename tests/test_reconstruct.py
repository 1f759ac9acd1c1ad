"""`invedit reconstruct` end to end: a subprocess run on the tiny random model writes the image,
the grid, the latents and run.json; each inversion method runs; bad input fails with one line on
stderr, exit code 2 and no output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from tests.oracle_fixtures import ORACLE

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ORACLE / "input.png"


def invedit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_reconstruct_tiny_random_end_to_end(tmp_path) -> None:
    out = tmp_path / "out"
    run = invedit("reconstruct", "--model", "tiny-random", "--image", str(IMAGE), "--prompt", "a round cake",
                  "--inversion", "direct", "--steps", "4", "--size", "64", "--save-latents", "--no-progress", "-o", str(out))
    assert run.returncode == 0, run.stderr
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["grid.png", "latents/final.npy", "latents/trajectory.npy", "latents/z0.npy", "reconstruction.png", "run.json"]
    rec = json.loads((out / "run.json").read_text())
    assert rec["params"]["inversion"] == "direct" and rec["params"]["steps"] == 4 and rec["image"]["used_size"] == [64, 64]
    assert {"load_model", "invert", "denoise", "decode", "total"} <= set(rec["timings_s"])
    assert rec["versions"]["torch"] and rec["inversion"]["settings"]["form"] == "fused"
    traj, z0, final = (np.load(out / "latents" / n) for n in ("trajectory.npy", "z0.npy", "final.npy"))
    assert traj.shape == (5, 1, 4, 8, 8) and z0.shape == final.shape == (1, 4, 8, 8)
    np.testing.assert_array_equal(traj[0], z0)
    assert np.abs(final - z0).max() < 1e-4 and rec["metrics"]["latent_max_abs"] < 1e-4  # DirectInversion is exact
    recon = np.asarray(Image.open(out / "reconstruction.png"))
    assert recon.shape == (64, 64, 3)
    inp = np.array(Image.open(IMAGE).convert("RGB").resize((64, 64)), dtype=np.float64)
    mse = float(((inp - recon) ** 2).mean())
    assert abs(rec["metrics"]["mse"] - mse) < 1e-6 * max(mse, 1)
    assert Image.open(out / "grid.png").size[0] == 64 + 4 + 64
    assert rec["metrics"]["unet_rows"] == {"inversion": 4, "denoise": 8, "total": 12}


@pytest.mark.parametrize("method", ["ddim", "negative-prompt", "null-text"])
def test_every_inversion_method_runs(tmp_path, method, capsys) -> None:
    out = tmp_path / method
    rc = cli.main(["reconstruct", "--model", "tiny-random", "--image", str(IMAGE), "--prompt", "a cake",
                   "--inversion", method, "--steps", "2", "--size", "64", "--no-progress", "-o", str(out)])
    assert rc == 0 and (out / "run.json").is_file() and (out / "reconstruction.png").is_file()
    rec = json.loads((out / "run.json").read_text())
    assert rec["params"]["inversion"] == method and not (out / "latents").exists()
    if method == "null-text":
        assert len(rec["metrics"]["inversion_cost"]["rounds_per_step"]) == 2
        assert len(rec["metrics"]["final_loss_per_step"]) == 2


def expect_clean_failure(tmp_path: Path, *args: str, message: str) -> None:
    out = tmp_path / "out"
    run = invedit("reconstruct", "--model", "tiny-random", "--prompt", "a cake", "--no-progress", "-o", str(out), *args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invedit reconstruct: error:") and message in lines[0], run.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_missing_image_fails_cleanly(tmp_path) -> None:
    expect_clean_failure(tmp_path, "--image", str(tmp_path / "nope.png"), message="nope.png")


def test_unreadable_image_fails_cleanly(tmp_path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    expect_clean_failure(tmp_path, "--image", str(bad), message="cannot read image")


def test_size_not_a_multiple_of_64_fails_cleanly(tmp_path) -> None:
    expect_clean_failure(tmp_path, "--image", str(IMAGE), "--size", "500", message="multiples of 64")
