"""`invedit eval score` on a synthetic PIE-Bench root and runs folder: the reference's CSV, the
NaN rules per item, the summary's means and counts, missing edits and missing weights."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torchmetrics")  # the eval extra
from evaluation.pie import score_command
from evaluation.pie.dataset import load_dataset
from evaluation.pie.layout import EditFormat, edit_path, write_edit
from evaluation.pie.metrics import DEFAULT_METRICS
from evaluation.pie.scores import Scorers, score_runs
from evaluation.pie.table import read_scores_csv
from ldm.errors import DataError, UsageError, WeightsError
from tests.pie_fixtures import ENTRIES, make_root, make_tiny_clip, make_tiny_dino

NO_LPIPS = [m for m in DEFAULT_METRICS if m != "lpips_unedit_part"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict[str, Path]:
    """A root, tiny CLIP/DINO folders, and a runs folder with three methods:
    copy (the source itself, PNG), jpeg-copy (the source in the reference's JPEG mode), and
    paint (the edit region painted white, plus a 4x4 background block darkened, PNG)."""
    base = tmp_path_factory.mktemp("bench")
    root = make_root(base / "data")
    runs = base / "runs"
    for item in load_dataset(root).items:
        source = np.asarray(Image.open(item.image_path).convert("RGB"))
        write_edit(edit_path(runs, "copy", item), source)
        write_edit(edit_path(runs, "jpeg-copy", item, EditFormat.JPEG), source, EditFormat.JPEG)
        painted, mask = source.copy(), item.mask()
        block = np.zeros(mask.shape, bool)
        block[200:204, 300:304] = True
        painted[mask] = 255
        painted[block & ~mask] = 0
        write_edit(edit_path(runs, "paint", item), painted)
    return {"root": root, "runs": runs, "clip": make_tiny_clip(base / "clip"), "dino": make_tiny_dino(base / "dino")}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    score_command.add_arguments(parser)
    return parser.parse_args(list(argv))


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def scored(bench, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scores") / "scores.csv"
    args = parse("--data", str(bench["root"]), "--runs", str(bench["runs"]), "--metrics", *NO_LPIPS,
                 "--clip", str(bench["clip"]), "--dino", str(bench["dino"]), "-o", str(out), "--no-progress")
    assert score_command.run(args) == 0
    return out


def test_csv_has_the_reference_header_and_one_row_per_item(scored: Path):
    rows = read_csv(scored)
    methods = ["copy", "jpeg-copy", "paint"]  # every folder of RUNS, sorted
    assert rows[0] == ["file_id"] + [f"{m}|{k}" for m in methods for k in NO_LPIPS]
    assert [r[0] for r in rows[1:]] == list(ENTRIES)


def test_an_unchanged_edit_scores_perfectly_and_a_fully_masked_photo_is_nan(scored: Path):
    table = read_scores_csv(scored)
    for item_id in ENTRIES:
        assert table.value(item_id, "copy", "structure_distance") == 0.0
        assert table.value(item_id, "copy", "clip_similarity_target_image") >= 0.0
    for item_id in ("000000000000", "111000000000", "211000000001"):
        assert table.value(item_id, "copy", "psnr_unedit_part") == math.inf
        assert table.value(item_id, "copy", "mse_unedit_part") == 0.0
        assert table.value(item_id, "copy", "ssim_unedit_part") == pytest.approx(1.0, abs=1e-6)
        assert 30 < table.value(item_id, "jpeg-copy", "psnr_unedit_part") < math.inf  # JPEG q75 loses a little
    # 911000000000's mask covers every interior pixel (and the border is forced): no background
    for metric in ("psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"):
        assert math.isnan(table.value("911000000000", "copy", metric))
    rows = {r[0]: r for r in read_csv(scored)}
    header = read_csv(scored)[0]
    assert rows["911000000000"][header.index("copy|psnr_unedit_part")] == "nan"  # as the reference writes it
    assert rows["000000000000"][header.index("copy|psnr_unedit_part")] == "inf"


def test_painting_the_edit_region_moves_only_what_it_should(scored: Path, bench):
    table = read_scores_csv(scored)
    # item 0: the 4x4 block at rows 200-203, cols 300-303 lies inside its mask (100..300 x 150..400),
    # so only the region changed: the background is untouched
    assert table.value("000000000000", "paint", "mse_unedit_part") == 0.0
    # item 1 (mask rows 200-259, cols 40-119): the block is background, darkened to 0
    source = np.asarray(Image.open(load_dataset(bench["root"]).items[1].image_path).convert("RGB"))
    expected = float(np.sum((source[200:204, 300:304] / 255.0) ** 2)) / (3 * 512 * 512)
    assert table.value("111000000000", "paint", "mse_unedit_part") == pytest.approx(expected, rel=1e-4)
    assert table.value("111000000000", "paint", "structure_distance") > 0
    # the source CLIP score does not depend on the method
    for item_id in ENTRIES:
        values = {table.value(item_id, m, "clip_similarity_source_image") for m in ("copy", "jpeg-copy", "paint")}
        assert len(values) == 1


def test_summary_means_exclude_nan_and_count_valid_items(scored: Path):
    rows = read_csv(scored)
    header, body = rows[0], rows[1:]
    summary = read_csv(scored.with_name("scores_summary.csv"))
    s_header = summary[0]
    line = next(r for r in summary[1:] if r[0] == "all" and r[1] == "paint")
    for metric, scale in (("mse_unedit_part", 1e4), ("structure_distance", 1e3), ("clip_similarity_target_image", 1)):
        cells = [float(r[header.index(f"paint|{metric}")]) for r in body]
        valid = [c for c in cells if not math.isnan(c)]
        column = f"{metric}_x{scale:g}" if scale != 1 else metric
        assert float(line[s_header.index(column)]) == pytest.approx(statistics.fmean(valid) * scale, rel=1e-9)
        assert int(line[s_header.index(f"{metric}_n")]) == len(valid)
    assert int(line[s_header.index("mse_unedit_part_n")]) == 3  # the fully masked photo left out
    assert int(line[s_header.index("structure_distance_n")]) == 4
    per_type = [r for r in summary[1:] if r[1] == "paint"]
    assert [r[0] for r in per_type] == ["all", "0", "1", "2", "9"]
    nine = per_type[-1]
    assert nine[s_header.index("psnr_unedit_part")] == "nan" and nine[s_header.index("psnr_unedit_part_n")] == "0"


def test_run_record_keeps_the_settings(scored: Path, bench):
    record = json.loads(scored.with_suffix(".json").read_text())
    assert record["command"] == "eval score"
    assert record["structure"]["antialias"] is False
    assert record["weights"] == {"clip": str(bench["clip"]), "dino": str(bench["dino"])}
    assert record["methods"] == ["copy", "jpeg-copy", "paint"] and record["items"] == 4


def test_a_missing_edit_names_the_item_and_method_and_skip_bad_leaves_it_empty(bench, tmp_path: Path):
    items = load_dataset(bench["root"], types=["1", "2"]).items
    runs = tmp_path / "runs"
    source = np.asarray(Image.open(items[0].image_path).convert("RGB"))
    write_edit(edit_path(runs, "m", items[0]), source)
    with pytest.raises(DataError, match="no edit of item 211000000001 by m"):
        score_runs(items, runs, ["m"], ["mse_unedit_part"], Scorers())
    table, skipped = score_runs(items, runs, ["m"], ["mse_unedit_part"], Scorers(), skip_bad=True, progress=False)
    assert table.value("111000000000", "m", "mse_unedit_part") == 0.0
    assert table.value("211000000001", "m", "mse_unedit_part") is None
    assert len(skipped) == 1 and "item 211000000001, m: no edit" in skipped[0]


def test_skip_bad_logs_and_leaves_out_a_malformed_entry(bench, tmp_path: Path, capsys):
    root = Path(shutil.copytree(bench["root"], tmp_path / "data"))
    mapping = json.loads((root / "mapping_file.json").read_text())
    mapping["211000000001"]["mask"] = [1, 2, 3]
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    common = ["--data", str(root), "--runs", str(bench["runs"]), "--methods", "copy", "--metrics", "mse_unedit_part",
              "-o", str(tmp_path / "s.csv"), "--no-progress"]
    with pytest.raises(DataError, match="item 211000000001: mask has 3 numbers"):
        score_command.run(parse(*common))
    assert score_command.run(parse(*common, "--skip-bad")) == 0
    assert "skipped: mapping_file.json: item 211000000001: mask has 3 numbers" in capsys.readouterr().err
    assert [row[0] for row in read_csv(tmp_path / "s.csv")[1:]] == ["000000000000", "111000000000", "911000000000"]


def test_an_edit_of_the_wrong_size_is_refused(bench, tmp_path: Path):
    item = load_dataset(bench["root"], types=["0"]).items[0]
    write_edit(edit_path(tmp_path, "m", item), np.zeros((256, 256, 3), np.uint8))
    with pytest.raises(DataError, match="edit is 256x256, the source is 512x512"):
        score_runs([item], tmp_path, ["m"], ["psnr_unedit_part"], Scorers(), progress=False)


def test_lpips_scores_through_an_injected_network(bench):
    items = load_dataset(bench["root"]).items
    table, _ = score_runs(items, bench["runs"], ["copy"], ["lpips_unedit_part"],
                          Scorers(lpips=lambda a, b: (a - b).abs().mean()), progress=False)
    assert [table.value(i.id, "copy", "lpips_unedit_part") for i in items[:3]] == [0.0, 0.0, 0.0]
    assert math.isnan(table.value("911000000000", "copy", "lpips_unedit_part"))


def test_missing_lpips_weights_stop_before_scoring(bench, tmp_path: Path):
    args = parse("--data", str(bench["root"]), "--runs", str(bench["runs"]), "--lpips", str(tmp_path / "no.pth"),
                 "-o", str(tmp_path / "s.csv"))
    with pytest.raises(WeightsError, match="--lpips"):
        score_command.run(args)
    assert not (tmp_path / "s.csv").exists()


def test_bad_options_are_usage_errors(bench, tmp_path: Path):
    common = ["--data", str(bench["root"]), "--runs", str(bench["runs"]), "-o", str(tmp_path / "s.csv")]
    with pytest.raises(UsageError, match="unknown metric 'psnr'"):
        score_command.run(parse(*common, "--metrics", "psnr"))
    with pytest.raises(UsageError, match="unknown editing type"):
        score_command.run(parse(*common, "--types", "x"))
    with pytest.raises(UsageError, match="expected a .csv"):
        score_command.run(parse(*common[:-1], str(tmp_path / "s.txt")))
    with pytest.raises(DataError, match="no such runs folder"):
        score_command.run(parse("--data", str(bench["root"]), "--runs", str(tmp_path / "none"), "-o", str(tmp_path / "s.csv"),
                                "--metrics", "mse_unedit_part"))


def test_ti2i_set_scores_and_reports_through_its_own_output_names(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from evaluation.pie import report_command

    root = tmp_path / "data"
    folder = root / "annotation_images" / "ti2i_benchmark" / "wild-ti2i" / "data"
    folder.mkdir(parents=True)
    Image.new("RGB", (512, 512), (90, 90, 90)).save(folder / "horse.jpg")
    rel = "data/annotation_images/ti2i_benchmark/wild-ti2i/data/horse.jpg"
    mapping = {key: {"image_path": rel, "original_prompt": "", "editing_prompt": prompt}
               for key, prompt in (("3", "a bronze horse"), ("4", "a pink horse"))}
    (root / "mapping_file_ti2i_benchmark.json").write_text(json.dumps(mapping))
    runs = tmp_path / "runs"
    for item, value in zip(load_dataset(root, "ti2i").items, (10, 240)):
        write_edit(edit_path(runs, "m", item), np.full((512, 512, 3), value, np.uint8))
    assert sorted(p.name for p in (runs / "m" / "annotation_images" / "ti2i_benchmark" / "wild-ti2i" / "data").iterdir()) \
        == ["horse_3.png", "horse_4.png"]
    out = tmp_path / "s.csv"
    assert score_command.run(parse("--data", str(root), "--set", "ti2i", "--runs", str(runs), "--metrics",
                                   "mse_unedit_part", "-o", str(out), "--no-progress")) == 0
    assert read_csv(out)[1:] == [["3", "nan"], ["4", "nan"]]  # no mask, no background
    parser = argparse.ArgumentParser()
    report_command.add_arguments(parser)
    report_command.run(parser.parse_args(["--scores", str(out), "--data", str(root), "--set", "ti2i",
                                          "--runs", str(runs), "-o", str(tmp_path / "r"), "--thumbnail", "32"]))
    sheet = np.asarray(Image.open(tmp_path / "r" / "contact_all.png").convert("RGB"))
    assert tuple(sheet[16, 32 + 4 + 16]) == (10, 10, 10)  # first row: item 3's edit beside its source
