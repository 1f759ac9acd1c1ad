"""Bad and unusual input through the command line: one line on stderr naming the problem and the
option, exit code 2, nothing written, and no other noise on stderr (warnings are errors here).

One test per class of input: numbers out of range, settings that would make the chosen method edit
nothing, images and sizes beyond memory, output paths that cannot be written, devices, accented and
non-Latin words, output folders that must never mix runs, EXIF orientation, misleading messages,
file permissions, --version, noise on stderr. Almost every refusal happens before the model is
built; the few runs that compute use the tiny random model at 64 px and 2 steps.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from ldm.tokenizer import Tokenizer
from tests.test_words import offsets_positions  # each word's positions from the tokenizer's offsets

RUN = ["--model", "tiny-random", "--size", "64", "--steps", "2", "--no-progress"]
CHEAP = ["--inversion", "ddim"]  # the runs that compute: the cheapest inversion


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
    return path


def edit_argv(photo: Path, out: Path, *extra: str, source: str = "a cat", target: str = "a dog") -> list[str]:
    return ["edit", *RUN, "--image", str(photo), "--source", source, "--target", target, "-o", str(out), *extra]


def refused(argv: list[str], capfd, tmp_path: Path, *needles: str) -> str:
    """Run the CLI with warnings as errors; exit 2, one stderr line holding every needle, no file
    added or removed under tmp_path."""
    before = sorted(tmp_path.rglob("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = cli.main(argv)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert sorted(tmp_path.rglob("*")) == before
    return lines[0]


# 1. numbers out of range
@pytest.mark.parametrize("extra,needle", [
    (["--guidance", "nan"], "--guidance"), (["--guidance", "inf"], "--guidance"),
    (["--prox", "l0", "--quantile", "1.5"], "--quantile"), (["--prox", "l1", "--quantile", "-0.1"], "--quantile"),
    (["--cross", "1.5"], "--cross"), (["--cross", "0.8:0.2"], "--cross"), (["--self", "-0.1"], "--self"),
    (["--self", "nan"], "--self"), (["--cross-word", "dog=0.6:0.2"], "--cross-word"),
    (["--cross-word", "dog=0:3"], "--cross-word"), (["--blend-start", "2"], "--blend-start"),
    (["--control", "pnp", "--pnp-features", "1.5"], "--pnp-features"),
    (["--control", "pnp", "--pnp-attention", "-1"], "--pnp-attention"),
    (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"), (["--steps", "5000"], "--steps"),
    (["--size", "0"], "size"), (["--size", "100"], "size"), (["--size", "-64"], "size"),
    (["--max-pixels", "0"], "--max-pixels"), (["--reweight", "dog=nan"], "--reweight"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**64)], "--seed"),
])
def test_numbers_out_of_range_are_refused_naming_the_option(extra, needle, photo, tmp_path, capfd):
    refused(edit_argv(photo, tmp_path / "out", *extra), capfd, tmp_path, needle)


# 2. settings under which the method would edit nothing: every method and option that can do it
@pytest.mark.parametrize("extra,needle", [
    (["--control", "masactrl", "--masactrl-step", "2"], "--masactrl-step"),  # steps are 0, 1
    (["--control", "masactrl", "--masactrl-step", "50"], "--masactrl-step"),
    (["--control", "masactrl", "--masactrl-step", "0", "--masactrl-layer", "99"], "--masactrl-layer"),
    (["--control", "pnp", "--pnp-features", "0", "--pnp-attention", "0"], "--pnp-features"),
    (["--control", "pnp", "--pnp-features", "0.4", "--pnp-attention", "0.1"], "--pnp-attention"),  # int(2 f) = 0
    (["--cross", "0", "--self", "0"], "--cross"),
    (["--cross", "0.9:1", "--self", "0"], "--self"),  # the window holds only the step after the last
    (["--replace", "--cross", "0", "--self", "0"], "--cross"),
    (["--self-min-level", "9"], "--self-min-level"),
    (["--blend", "cat dog", "--blend-level", "9"], "--blend-level"),
    (["--blend", "cat dog", "--blend-start", "1"], "--blend-start"),
    (["--inversion", "stylediffusion", "--control", "stylediffusion-p2p", "--sd-value", "0", "--sd-cross", "0",
      "--sd-self", "0"], "--sd-cross"),
])
def test_settings_that_would_edit_nothing_are_refused_before_compute(extra, needle, photo, tmp_path, capfd):
    line = refused(edit_argv(photo, tmp_path / "out", *extra), capfd, tmp_path, needle, "would edit nothing")
    assert "--control none" in line  # the documented way to ask for an edit without control


def test_an_ablation_can_still_ask_for_the_idle_method_through_the_api():
    from evaluation.api import plan_edit
    from evaluation.registry import Registry
    from ldm.model import model_facts

    spec = Registry().edit_spec(method="masactrl", source="a cat", target="a dog", steps=2, start_step=2,
                                allow_idle=True)
    assert plan_edit(model_facts("tiny-random"), spec).controllers
    assert spec.as_dict()["allow_idle"] is True  # said in run.json
    # proximal guidance changes the target by itself: empty attention windows leave it an edit
    prox = Registry().edit_spec(method="p2p", source="a cat", target="a dog", steps=2, prox="l0", cross=0.0, self_=0.0)
    assert plan_edit(model_facts("tiny-random"), prox).controllers


def huge_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (its pixels are never decoded)."""
    path.write_bytes(b"")
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then IHDR's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


# 3. images and sizes beyond memory
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, capfd):
    bomb = huge_png(tmp_path / "bomb.png", 20000, 20000)
    refused(edit_argv(bomb, tmp_path / "out"), capfd, tmp_path, "20000x20000", "--max-pixels")
    big = huge_png(tmp_path / "big.png", 12000, 12000)  # PIL would only warn
    refused(edit_argv(big, tmp_path / "out"), capfd, tmp_path, "12000x12000", "--max-pixels")


def test_a_size_beyond_memory_is_refused_with_the_estimate(photo, tmp_path, capfd):
    line = refused(edit_argv(photo, tmp_path / "out", "--size", "64000"), capfd, tmp_path, "--size", "GiB")
    assert "64000x64000" in line


# 4. output paths that cannot be written, checked before any weight is loaded
def test_unwritable_outputs_are_refused_at_once(photo, tmp_path, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(edit_argv(photo, blocker / "out"), capfd, tmp_path, "a-file is a file")
    refused(edit_argv(photo, blocker), capfd, tmp_path, "not a directory")
    refused(edit_argv(photo, tmp_path / "out", "--save-inversion", str(blocker / "inv.safetensors")), capfd,
            tmp_path, "a-file is a file")
    refused(["invert", *RUN, "--image", str(photo), "--prompt", "a cat", "-o", str(blocker / "x.safetensors")],
            capfd, tmp_path, "a-file is a file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        refused(edit_argv(photo, locked / "out"), capfd, tmp_path, "cannot write")


# 5. devices
@pytest.mark.parametrize("device", ["cuda:7", "xyz", "meta"])
def test_an_absent_or_unknown_device_names_the_devices_there_are(device, photo, tmp_path, capfd):
    refused(edit_argv(photo, tmp_path / "out", "--device", device), capfd, tmp_path, "--device", "cpu")


# 6. accented and non-Latin words, positions against the tokenizer's own offsets
@pytest.mark.parametrize("source,target,extra", [
    ("a crème brûlée on a plate", "a crème brûlée on a Straße", []),  # refine
    ("a café in Köln", "a café in 東京", ["--replace"]),
    ("a Pokémon toy", "a Pokémon plüsch toy", ["--reweight", "plüsch=2"]),
    ("a crème brûlée on a plate", "a crème tarte on a plate", ["--blend", "brûlée tarte"]),  # LocalBlend
])
def test_accented_and_non_latin_prompts_edit_on_their_own_tokens(source, target, extra, photo, tmp_path, capfd):
    out = tmp_path / "out"
    assert cli.main(edit_argv(photo, out, *CHEAP, *extra, source=source, target=target)) == 0
    record = json.loads((out / "run.json").read_text())
    words = record["edits"][0]["words"]
    assert [w for w, _ in words] == target.split(" ")
    assert [p for _, p in words] == offsets_positions(Tokenizer.bundled(), target)
    assert record["metrics"]["sites_touched"] > 0


# 7, 8, 10: a run into an existing folder, EXIF orientation, permissions
def test_a_failed_rerun_leaves_the_earlier_folder_whole_and_outputs_follow_the_umask(tmp_path, capfd):
    sideways = tmp_path / "sideways.jpg"
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image.save(sideways, exif=exif)
    out = tmp_path / "out"
    assert cli.main(edit_argv(sideways, out, *CHEAP)) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["image"]["exif_orientation"] == 6 and record["image"]["orientation_applied"] is True
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    kept = {f.name: f.read_bytes() for f in out.iterdir()}
    # the rerun fails after its output folder was set up (the image is read inside it)
    refused(edit_argv(huge_png(tmp_path / "bomb.png", 20000, 20000), out, target="a bird"), capfd, tmp_path,
            "--max-pixels")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png", "out", "sideways.jpg"]


def test_the_pixels_as_stored_on_request(tmp_path):
    from evaluation.images import file_info, read_rgb

    path = tmp_path / "sideways.jpg"
    image = Image.new("RGB", (96, 64))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif)
    assert read_rgb(path).shape == (96, 64, 3)  # upright
    assert read_rgb(path, orient=False).shape == (64, 96, 3)
    assert file_info(path, orient=False)["orientation_applied"] is False


# 9. messages that used to mislead
def test_messages_name_what_is_wrong(photo, tmp_path, capfd):
    refused(edit_argv(photo, tmp_path / "out", "--blend", "pie pie", source="a pie", target="a cake"), capfd,
            tmp_path, "--blend target word 'pie'")
    for blank in ("", "   ", "[ ]"):
        refused(edit_argv(photo, tmp_path / "out", target=blank), capfd, tmp_path, "--target", "blank")
    legacy = tmp_path / "legacy.ckpt"
    with open(legacy, "wb") as f:
        pickle.dump({"state_dict": OrderedDict(a=1)}, f, protocol=4)
    line = refused(["convert", str(legacy), str(tmp_path / "model")], capfd, tmp_path, "collections.OrderedDict")
    assert "weights_only" not in line


# 11. --version
def test_version_prints_the_version(capfd):
    assert cli.main(["--version"]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("invedit ") and not err


# 12. stderr holds our line only
def test_an_over_long_prompt_is_our_one_line_only(photo, tmp_path, capfd):
    refused(edit_argv(photo, tmp_path / "out", target=" ".join(["dog"] * 90)), capfd, tmp_path, "90 tokens")
