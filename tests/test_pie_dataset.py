"""PIE-Bench reader: mask decoding, prompt cleaning, filtering, malformed entries, TI2I, output layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.pie.dataset import load_dataset
from evaluation.pie.layout import EditFormat, edit_path, find_edit, read_edit, write_edit
from evaluation.pie.masks import decode_mask
from ldm.errors import DataError, UsageError
from tests.pie_fixtures import ENTRIES, expected_mask, make_root

N = 512 * 512


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "data")


def border() -> np.ndarray:
    mask = np.zeros((512, 512), bool)
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = True, True, True, True
    return mask


def test_mask_runs_mark_row_major_pixels_and_the_border():
    # two runs of 30 on rows 10 and 11 from column 20; written by hand as flat (start, length)
    mask = decode_mask([10 * 512 + 20, 30, 11 * 512 + 20, 30])
    expected = border()
    expected[10:12, 20:50] = True
    assert mask.dtype == bool and mask.shape == (512, 512)
    assert np.array_equal(mask, expected)
    assert mask.sum() == 4 * 511 + 60


def test_mask_run_past_a_row_end_continues_on_the_next_row():
    mask = decode_mask([5 * 512 + 508, 8])  # columns 508..511 of row 5, then 0..3 of row 6
    expected = border()
    expected[5, 508:] = True
    expected[6, :4] = True
    assert np.array_equal(mask, expected)


def test_mask_run_past_the_last_pixel_is_cut_and_empty_runs_mark_nothing():
    mask = decode_mask([N - 3, 100, 1000, 0])
    assert np.array_equal(mask, border())  # the last 3 pixels lie on the (already set) border
    mask = decode_mask([300 * 512 + 200, 5, 300 * 512 + 202, 5])  # overlapping runs: union
    assert mask[300, 199:209].tolist() == [False] + [True] * 7 + [False, False]


def test_an_empty_mask_is_the_border_alone():
    assert np.array_equal(decode_mask([]), border())


@pytest.mark.parametrize(
    "runs, reason",
    [([1, 2, 3], "even count"), ([-1, 5], "outside"), ([N, 5], "outside"), ([10, -2], "negative length"),
     ([10, 2.5], "integers"), ([True, 3], "integers"), ("0 5", "expected a list")],
)
def test_undecodable_masks_are_refused_with_the_reason(runs, reason):
    with pytest.raises(DataError, match=reason):
        decode_mask(runs)


def test_reader_returns_every_entry_in_file_order_with_its_fields(root: Path):
    data = load_dataset(root)
    assert [item.id for item in data.items] == list(ENTRIES)
    item = data.items[1]
    assert item.relative_path == "1_change_object_80/1_artificial/1_animal/111000000000.jpg"
    assert item.image_path == root / "annotation_images" / item.relative_path
    assert item.output_name == item.relative_path
    assert item.editing_type == "1"
    assert item.blend_words == ("cat", "dog")
    assert item.instruction == "instruction 111000000000"
    assert data.items[2].blend_words is None  # blended_word ""
    for item in data.items:
        assert np.array_equal(item.mask(), expected_mask(item.id)), item.id
    assert data.skipped == ()


def test_prompts_lose_their_brackets_and_nothing_else(root: Path):
    items = {item.id: item for item in load_dataset(root).items}
    assert items["000000000000"].target_prompt == "a slanted rusty mountain bicycle on the road"
    # the reference's replace("[", "").replace("]", ""): the double space stays
    assert items["111000000000"].source_prompt == "a cat sitting  on a mat"
    assert items["111000000000"].target_prompt == "a dog sitting  on a mat"
    assert items["211000000001"].target_prompt == "a bowl of apples on a table"


def test_types_filter_keeps_only_those_types(root: Path):
    assert [i.id for i in load_dataset(root, types=["9", "1"]).items] == ["111000000000", "911000000000"]
    assert load_dataset(root, types=["5"]).items == ()
    with pytest.raises(UsageError, match="unknown editing type '12'"):
        load_dataset(root, types=["12"])


def corrupt(root: Path, key: str, **changes) -> None:
    path = root / "mapping_file.json"
    mapping = json.loads(path.read_text())
    for field, value in changes.items():
        if value is None:
            del mapping[key][field]
        else:
            mapping[key][field] = value
    path.write_text(json.dumps(mapping))


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"mask": [5, 5, 5]}, "mask has 3 numbers"),
        ({"mask": [N + 10, 2]}, "outside the 512x512 image"),
        ({"mask": None}, "missing field 'mask'"),
        ({"editing_prompt": 7}, "field 'editing_prompt' is a int"),
        ({"editing_type_id": 1}, "field 'editing_type_id' is a int"),
        ({"editing_type_id": "11"}, "editing_type_id '11'"),
        ({"blended_word": "cat"}, "blended_word 'cat'"),
        ({"image_path": "1_change_object_80/nothere.jpg"}, "nothere.jpg is missing"),
        ({"image_path": "../../etc/passwd"}, "must be a relative path"),
    ],
)
def test_malformed_entry_is_one_line_naming_the_item(root: Path, changes, reason):
    corrupt(root, "111000000000", **changes)
    with pytest.raises(DataError) as err:
        load_dataset(root)
    message = str(err.value)
    assert "mapping_file.json: item 111000000000:" in message and reason in message
    assert "\n" not in message


def test_entries_of_other_types_are_not_checked(root: Path):
    corrupt(root, "111000000000", mask=[1, 2, 3])
    assert [i.id for i in load_dataset(root, types=["0", "9"]).items] == ["000000000000", "911000000000"]
    with pytest.raises(DataError, match="item 111000000000"):
        load_dataset(root, types=["1"])


def test_skip_bad_leaves_out_the_bad_items_and_says_which(root: Path):
    corrupt(root, "111000000000", mask=[1, 2, 3])
    (root / "annotation_images" / ENTRIES["211000000001"][0]).unlink()
    data = load_dataset(root, skip_bad=True)
    assert [i.id for i in data.items] == ["000000000000", "911000000000"]
    assert len(data.skipped) == 2
    assert "item 111000000000: mask has 3 numbers" in data.skipped[0]
    assert "item 211000000001: image" in data.skipped[1] and "is missing" in data.skipped[1]


def test_missing_root_and_unreadable_mapping_file_are_data_errors(tmp_path: Path, root: Path):
    with pytest.raises(DataError, match="no such benchmark folder"):
        load_dataset(tmp_path / "nowhere")
    (root / "mapping_file.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_dataset(root, skip_bad=True)  # a broken file is not one bad item
    (root / "mapping_file.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected one JSON object"):
        load_dataset(root)
    (root / "mapping_file.json").unlink()
    with pytest.raises(DataError, match="no mapping file"):
        load_dataset(root)


def test_ti2i_file_is_read_with_its_repo_relative_paths(root: Path):
    folder = root / "annotation_images" / "ti2i_benchmark" / "wild-ti2i" / "data"
    folder.mkdir(parents=True)
    Image.new("RGB", (640, 480), "red").save(folder / "horse.jpg")
    rel = "data/annotation_images/ti2i_benchmark/wild-ti2i/data/horse.jpg"
    ti2i = {"3": {"image_path": rel, "original_prompt": "", "editing_prompt": "a photo of a [bronze] horse"},
            "4": {"image_path": rel, "original_prompt": "", "editing_prompt": "a pink horse"}}
    (root / "mapping_file_ti2i_benchmark.json").write_text(json.dumps(ti2i))
    data = load_dataset(root, "ti2i")
    a, b = data.items
    assert a.relative_path == b.relative_path == "ti2i_benchmark/wild-ti2i/data/horse.jpg"
    assert a.image_path == folder / "horse.jpg"
    assert (a.output_name, b.output_name) == ("ti2i_benchmark/wild-ti2i/data/horse_3.jpg",
                                              "ti2i_benchmark/wild-ti2i/data/horse_4.jpg")
    assert a.target_prompt == "a photo of a bronze horse" and a.source_prompt == ""
    assert a.mask() is None and a.editing_type is None and a.blend_words is None
    with pytest.raises(UsageError, match="no editing types"):
        load_dataset(root, "ti2i", types=["1"])


def test_edit_paths_follow_the_reference_layout(root: Path, tmp_path: Path):
    item = load_dataset(root).items[1]
    runs = tmp_path / "runs"
    rel = "1_change_object_80/1_artificial/1_animal/111000000000"
    assert edit_path(runs, "ddim+p2p", item) == runs / "ddim+p2p" / "annotation_images" / f"{rel}.png"
    assert edit_path(runs, "ddim+p2p", item, EditFormat.JPEG) == runs / "ddim+p2p" / "annotation_images" / f"{rel}.jpg"
    for bad in ("", "..", "a/b", ".hidden"):
        with pytest.raises(UsageError, match="folder name"):
            edit_path(runs, bad, item)


def test_jpeg_mode_writes_what_pil_default_save_writes(root: Path, tmp_path: Path):
    item = load_dataset(root).items[0]
    image = np.asarray(Image.open(item.image_path).convert("RGB"))
    path = edit_path(tmp_path, "m", item, EditFormat.JPEG)
    write_edit(path, image, EditFormat.JPEG)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")  # the reference's .save(path): PIL defaults
    assert path.read_bytes() == buffer.getvalue()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    assert find_edit(tmp_path, "m", item) == path
    png = edit_path(tmp_path, "m", item)
    write_edit(png, image)
    assert find_edit(tmp_path, "m", item) == png  # PNG preferred when both exist
    assert np.array_equal(read_edit(png, (512, 512)), image)


def test_reading_a_reference_strip_takes_its_right_most_square(tmp_path: Path):
    panels = [np.full((512, 512, 3), v, np.uint8) for v in (10, 60, 110, 160)]
    path = tmp_path / "strip.png"
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)
    assert np.array_equal(read_edit(path, (512, 512)), panels[-1])
    with pytest.raises(DataError, match="edit is 2048x512, the source is 256x256"):
        read_edit(path, (256, 256))
