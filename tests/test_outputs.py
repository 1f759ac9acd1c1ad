"""Run outputs shared by reconstruct and edit (evaluation/outputs.py): grid layout, metrics,
atomic .npy and run.json content."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from evaluation.outputs import StageTimer, grid, image_mse_psnr, run_record, save_npy, write_run_json


def test_grid_places_images_side_by_side_with_captions_below() -> None:
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((32, 48, 3), np.uint8)
    blue[..., 2] = 255
    plain = grid([red, blue], pad=4)
    assert plain.shape == (64, 64 + 4 + 48, 3)
    np.testing.assert_array_equal(plain[:64, :64], red)
    np.testing.assert_array_equal(plain[:32, 68:], blue)
    assert (plain[32:, 68:] == 255).all() and (plain[:, 64:68] == 255).all()  # white padding

    captioned = grid([red, blue], ["source image with a long caption that wraps", "edit"], pad=4)
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > 64
    np.testing.assert_array_equal(captioned[:64, :64], red)
    below = captioned[68:]
    assert (below[:, :64] < 128).any() and (below[:, 68:] < 128).any()  # text drawn under each image


def test_image_mse_psnr_known_values() -> None:
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[...] = 102
    mse, psnr = image_mse_psnr(a, b)
    assert mse == 4.0 and math.isclose(psnr, 10 * math.log10(255**2 / 4))
    assert image_mse_psnr(a, a) == (0.0, float("inf"))


def test_save_npy_is_float32_atomic_and_stacks_lists(tmp_path) -> None:
    ts = [torch.full((1, 4, 2, 2), float(i), dtype=torch.float64) for i in range(3)]
    save_npy(tmp_path / "sub" / "traj.npy", ts)
    arr = np.load(tmp_path / "sub" / "traj.npy")
    assert arr.dtype == np.float32 and arr.shape == (3, 1, 4, 2, 2) and arr[2].min() == 2
    save_npy(tmp_path / "one.npy", torch.ones(2, 3))
    assert np.load(tmp_path / "one.npy").shape == (2, 3)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["one.npy", "traj.npy"]  # no temp files


def test_run_record_has_params_timings_metrics_and_versions(tmp_path) -> None:
    timer = StageTimer()
    with timer("invert"):
        pass
    with timer("invert"):
        pass
    with timer("denoise"):
        pass
    times = timer.as_dict()
    assert set(times) == {"invert", "denoise", "total"} and times["total"] >= times["invert"] >= 0
    rec = run_record("edit", {"steps": 50, "size": (512, 512)}, times, {"psnr_db": float("inf")}, controller={"kind": "p2p"})
    write_run_json(tmp_path / "run.json", rec)
    back = json.loads((tmp_path / "run.json").read_text())
    assert back["command"] == "edit" and back["params"]["size"] == [512, 512]
    assert back["metrics"]["psnr_db"] == "inf" and back["controller"] == {"kind": "p2p"}
    assert back["versions"]["torch"] == torch.__version__ and "python" in back["versions"]
    assert back["timings_s"]["total"] == times["total"]
