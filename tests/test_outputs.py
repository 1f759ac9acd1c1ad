"""What commands write (evaluation/outputs.py, evaluation/pictures.py): grids, heat maps, an output
folder that appears whole or not at all, file permissions, run.json content."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

import os
import stat
from pathlib import Path

import pytest

from evaluation.images import image_mse_psnr
from evaluation.outputs import RunDirectory, run_record
from evaluation.pictures import attention_sheet, colorize, grid, heat_overlay
from evaluation.timing import StageTimer
from ldm.errors import UsageError
from ldm.files import write_bytes


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


def test_grid_wraps_into_rows_of_columns() -> None:
    tiles = [np.full((20, 30, 3), 10 * i, np.uint8) for i in range(5)]
    sheet = grid(tiles, columns=2, pad=2)
    assert sheet.shape == (3 * 20 + 2 * 2, 2 * 30 + 2, 3)  # 3 rows of at most 2
    np.testing.assert_array_equal(sheet[22:42, 32:62], tiles[3])  # second row, second column
    assert (sheet[44:, 32:] == 255).all()  # the last row has one image: white beside it


def test_heat_colours_run_from_black_to_white_and_overlay_keeps_the_photo() -> None:
    ramp = colorize(np.linspace(0, 1, 11)[None])[0]
    assert tuple(ramp[0]) == (0, 0, 0) and tuple(ramp[-1]) == (255, 255, 255)
    assert (np.diff(ramp.astype(int).sum(-1)) >= 0).all()  # brighter as the value grows
    photo = np.zeros((8, 8, 3), np.uint8)
    photo[:, :4] = 200
    cold = heat_overlay(photo, np.zeros((8, 8)))
    assert cold[0, 0].sum() > cold[0, 7].sum()  # with no heat the (dimmed) photo shows through
    hot = heat_overlay(photo, np.ones((8, 8)))
    assert hot[0, 7].min() > cold[0, 7].max()


def test_attention_sheet_has_one_tile_per_word_with_tokens() -> None:
    import torch

    maps = torch.zeros(77, 4, 4)
    maps[1, 0, 0] = 1.0  # word 1 attends to the top-left corner
    maps[2, 3, 3] = 1.0
    photo = np.full((64, 64, 3), 128, np.uint8)
    sheet = attention_sheet(photo, maps, [("cat", [1]), ("mat", [2]), ("", [])], tile=32, columns=6)
    assert sheet.shape[1] == 32 * 2 + 4  # two tiles (the word without tokens is left out)
    first, second = sheet[:32, :32].astype(int).sum(-1), sheet[:32, 36:68].astype(int).sum(-1)
    assert first[:8, :8].mean() > first[-8:, -8:].mean() and second[-8:, -8:].mean() > second[:8, :8].mean()
    assert attention_sheet(photo, maps, [("", [])]) is None


def test_run_directory_appears_whole_and_replaces_an_earlier_run_only_at_commit(tmp_path) -> None:
    out = tmp_path / "out"
    first = RunDirectory(out)
    first.png("edited.png", np.zeros((8, 8, 3), np.uint8))
    assert not out.exists()  # nothing visible before the commit
    first.commit({"run": 1})
    second = RunDirectory(out)
    second.png("edited.png", np.ones((8, 8, 3), np.uint8))
    second.npy("latents/final.npy", [torch.zeros(1, 2), torch.ones(1, 2)])
    assert json.loads((out / "run.json").read_text()) == {"run": 1}  # the earlier run is intact meanwhile
    assert not (out / "latents").exists()
    second.commit({"run": 2})
    assert json.loads((out / "run.json").read_text()) == {"run": 2}
    final = np.load(out / "latents" / "final.npy")
    assert final.dtype == np.float32 and final.shape == (2, 1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folders left


def test_a_failed_run_leaves_the_earlier_folder_untouched(tmp_path) -> None:
    out = tmp_path / "out"
    RunDirectory(out).commit({"run": 1})
    with pytest.raises(RuntimeError):
        with RunDirectory(out) as run:
            run.png("edited.png", np.zeros((8, 8, 3), np.uint8))
            raise RuntimeError("killed")
    assert json.loads((out / "run.json").read_text()) == {"run": 1} and not (out / "edited.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_that_cannot_be_written_is_refused_at_once(tmp_path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        RunDirectory(afile)
    with pytest.raises(UsageError, match="cannot write"):
        RunDirectory(afile / "under-a-file")
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="cannot write"):
            RunDirectory(locked / "out")


def test_written_files_get_the_permissions_of_a_plain_write(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        write_bytes(tmp_path / "a.bin", b"x")
        run = RunDirectory(tmp_path / "out")
        run.png("edited.png", np.zeros((4, 4, 3), np.uint8))
        run.commit({})
    finally:
        os.umask(old)
    for p in (tmp_path / "a.bin", tmp_path / "out" / "edited.png", tmp_path / "out" / "run.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


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
    RunDirectory(tmp_path / "o").commit(rec)
    back = json.loads((tmp_path / "o" / "run.json").read_text())
    assert back["command"] == "edit" and back["params"]["size"] == [512, 512]
    assert back["metrics"]["psnr_db"] == "inf" and back["controller"] == {"kind": "p2p"}
    assert back["versions"]["torch"] == torch.__version__ and "python" in back["versions"]
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # run from a checkout: the commit is recorded
        assert back["versions"]["invedit"]["git_commit"]
    assert back["timings_s"]["total"] == times["total"]
