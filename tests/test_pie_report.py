"""`invedit eval report` on a synthetic runs folder: the markdown tables beside Table 1, the
trade-off plot and the contact sheets (source, then each method's edit of the same photo)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")  # the eval extra
from evaluation.pie import report_command
from evaluation.pie.dataset import load_dataset
from evaluation.pie.layout import edit_path, write_edit
from evaluation.pie.metrics import TABLE1
from ldm.errors import DataError
from tests.pie_fixtures import ENTRIES, make_root

METHODS = ("ddim+p2p", "mine")  # one the reference published, one it did not
SOURCE_RGB = (30, 120, 220)
EDIT_RGB = {"ddim+p2p": (240, 40, 40), "mine": (20, 200, 60)}
IDS = list(ENTRIES)
# per item, per method: structure distance, PSNR, LPIPS, MSE, SSIM, CLIP whole, CLIP edited (raw, unscaled)
VALUES = {
    "ddim+p2p": [[0.01, 20.0, 0.2, 0.02, 0.7, 25.0, 22.0], [0.02, 22.0, 0.1, 0.01, 0.8, 24.0, 21.0],
                 [0.03, 24.0, 0.3, 0.03, 0.9, 23.0, 20.0], [0.04, float("nan"), float("nan"), float("nan"), float("nan"), 22.0, 19.0]],
    "mine": [[0.001, 30.0, 0.05, 0.001, 0.95, 26.0, 23.0]] * 4,
}


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("report")
    root = make_root(base / "data")
    runs = base / "runs"
    for item in load_dataset(root).items:
        Image.new("RGB", (512, 512), SOURCE_RGB).save(item.image_path, quality=95)  # solid: easy to find in a sheet
        for method in METHODS:
            write_edit(edit_path(runs, method, item), np.full((512, 512, 3), EDIT_RGB[method], np.uint8))
    scores = base / "scores.csv"
    with open(scores, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_id"] + [f"{m}|{k}" for m in METHODS for k in TABLE1])
        for n, item_id in enumerate(IDS):
            writer.writerow([item_id] + [repr(v) for m in METHODS for v in VALUES[m][n]])
    out = base / "report"
    args = argparse.ArgumentParser()
    report_command.add_arguments(args)
    assert report_command.run(args.parse_args(["--scores", str(scores), "--data", str(root), "--runs", str(runs),
                                               "-o", str(out), "--thumbnail", "128"])) == 0
    return {"root": root, "runs": runs, "scores": scores, "out": out}


def table_lines(markdown: str, heading: str) -> list[str]:
    """The table rows (without the two heading lines) of the first table after `heading`."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start + 2 : end]


def test_overall_table_has_our_means_then_the_published_row(case):
    text = (case["out"] / "report.md").read_text()
    rows = table_lines(text, "## All photos")
    # ddim+p2p: structure mean 0.025 x10^3; PSNR over the 3 photos with a background (20, 22, 24)
    assert rows[0] == ("| **ddim+p2p** | 25.00 | 22.00 (n=3/4) | 200.00 (n=3/4) | 200.00 (n=3/4) | 80.00 (n=3/4) "
                       "| 23.50 | 20.50 |")
    assert rows[1] == "| ddim+p2p (Table 1) | 69.43 | 17.87 | 208.80 | 219.88 | 71.14 | 25.01 | 22.44 |"
    assert rows[2] == "| **mine** | 1.00 | 30.00 | 50.00 | 10.00 | 95.00 | 26.00 | 23.00 |"
    assert len(rows) == 3  # no published row for a method the reference did not run
    heading = text.split("## All photos", 1)[1].splitlines()[2]
    assert "Structure distance x10^3 ↓" in heading and "PSNR ↑" in heading and "CLIP edited ↑" in heading


def test_the_whole_table_1_is_printed_for_context(case):
    text = (case["out"] / "report.md").read_text()
    rows = table_lines(text, "### PnP Inversion")
    assert len(rows) == 11
    assert rows[4] == "| DirectInversion + P2P | 11.65 | 27.22 | 54.55 | 32.86 | 84.76 | 25.02 | 22.10 |"


def test_one_section_per_editing_type_with_its_own_means(case):
    text = (case["out"] / "report.md").read_text()
    assert [line for line in text.splitlines() if line.startswith("## ") and line[3].isdigit()] == [
        "## 0: random (1 photos)", "## 1: change object (1 photos)", "## 2: add object (1 photos)",
        "## 9: change style (1 photos)"]
    rows = table_lines(text, "## 1: change object")
    assert rows[0] == "| ddim+p2p | 20.00 | 22.00 | 100.00 | 100.00 | 80.00 | 24.00 | 21.00 |"
    rows = table_lines(text, "## 9: change style")
    assert rows[0] == "| ddim+p2p | 40.00 | n/a (n=0/1) | n/a (n=0/1) | n/a (n=0/1) | n/a (n=0/1) | 22.00 | 19.00 |"


def test_plot_is_a_picture_linked_from_the_report(case):
    text = (case["out"] / "report.md").read_text()
    assert "](preservation_vs_fidelity.png)" in text
    with Image.open(case["out"] / "preservation_vs_fidelity.png") as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # more than a blank canvas


def test_contact_sheet_shows_the_source_then_each_method_in_order(case):
    text = (case["out"] / "report.md").read_text()
    sheets = sorted(p.name for p in case["out"].glob("contact_*.png"))
    assert sheets == ["contact_0_random.png", "contact_1_change_object.png", "contact_2_add_object.png",
                      "contact_9_change_style.png"]
    for name in sheets:
        assert f"]({name})" in text
    sheet = np.asarray(Image.open(case["out"] / "contact_1_change_object.png").convert("RGB")).astype(int)
    tile, pad = 128, 4  # --thumbnail 128; evaluation/outputs.grid puts 4 px between images
    assert sheet.shape[1] == 3 * tile + 2 * pad
    centres = [sheet[tile // 2, c * (tile + pad) + tile // 2] for c in range(3)]
    for got, want in zip(centres, [SOURCE_RGB, EDIT_RGB["ddim+p2p"], EDIT_RGB["mine"]]):
        assert np.abs(got - np.array(want)).max() <= 3  # JPEG source, PNG edits


def test_a_missing_edit_is_a_grey_tile_and_unknown_items_are_refused(case, tmp_path: Path):
    runs = tmp_path / "runs"
    items = load_dataset(case["root"]).items
    write_edit(edit_path(runs, "ddim+p2p", items[0]), np.full((512, 512, 3), 9, np.uint8))
    out = tmp_path / "r"
    parser = argparse.ArgumentParser()
    report_command.add_arguments(parser)
    report_command.run(parser.parse_args(["--scores", str(case["scores"]), "--data", str(case["root"]),
                                          "--runs", str(runs), "-o", str(out), "--thumbnail", "64"]))
    sheet = np.asarray(Image.open(out / "contact_0_random.png").convert("RGB")).astype(int)
    assert tuple(sheet[32, 64 + 4 + 32]) == (9, 9, 9) and tuple(sheet[32, 2 * (64 + 4) + 32]) == (200, 200, 200)
    with open(case["scores"]) as f:
        text = f.read()
    bad = tmp_path / "bad.csv"
    bad.write_text(text + "123456789012" + ",1.0" * 14 + "\n")
    with pytest.raises(DataError, match="item 123456789012 is not in"):
        report_command.run(parser.parse_args(["--scores", str(bad), "--data", str(case["root"]),
                                              "--runs", str(runs), "-o", str(out)]))
