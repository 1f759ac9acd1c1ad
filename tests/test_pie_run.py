"""`invedit eval run` on the synthetic PIE-Bench root with tiny-random: the reference's per-item
settings, the shared DDIM trajectory changing nothing, the reference's JPEG strips, failures that
do not stop the run, resuming after SIGKILL with every output present exactly once, and two
torchrun ranks splitting the items.

Expected values come from elsewhere than the runner: output paths from the fixture's table, edits
from the editing API called without any sharing, UNet counts from those unshared edits, the
ranks' shares from the mapping file's order.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import main
from evaluation.api import edit
from evaluation.images import load_image
from evaluation.pie.dataset import load_dataset
from evaluation.pie.layout import EditFormat, find_edit, read_edit
from evaluation.pie.runner import RunSettings, run_items
from evaluation.registry import Registry
from ldm.errors import PromptError
from ldm.model import StableDiffusion
from tests.pie_fixtures import ENTRIES, make_root

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
P2P_PAIR = ("ddim+p2p", "directinversion+p2p")  # both start from the DDIM trajectory, same texts
MASACTRL = "ddim+masactrl"  # takes no blend words; inverts with "", so its own trajectory


def png_name(method: str, rel: str) -> str:
    """RUNS-relative output path of ENTRIES' relative photo path, as the reference lays it out."""
    return f"{method}/annotation_images/{rel.removesuffix('.jpg')}.png"


def expected_outputs(methods: tuple[str, ...]) -> set[str]:
    return {png_name(m, entry[0]) for m in methods for entry in ENTRIES.values()}


def files_below(runs: Path, methods: tuple[str, ...]) -> set[str]:
    """Every file in the methods' folders, hidden ones (temporaries) included."""
    return {p.relative_to(runs).as_posix() for m in methods for p in (runs / m).rglob("*") if p.is_file()}


def pixels(path: Path | io.BytesIO) -> np.ndarray:
    with Image.open(path) as im:
        im.load()  # a truncated file fails here
        return np.asarray(im.convert("RGB"))


def log_records(runs: Path) -> list[dict]:
    """Every complete line of the run logs (a line without its newline is still being written)."""
    lines = [line for p in sorted(runs.glob("logs/*.jsonl")) for line in p.read_text().split("\n")[:-1]]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("pie") / "data")


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return StableDiffusion.tiny_random()  # what --model tiny-random builds


def unshared(sd: StableDiffusion, item, method: str, steps: int, blend: bool):
    """The edit as a user of the API would make it alone: its own inversion, nothing shared."""
    extra = {"blend": item.blend_words} if blend else {}
    spec = Registry().edit_spec(method, source=item.source_prompt, target=item.target_prompt, steps=steps,
                                seed=1234, guidance=7.5, **extra)
    return edit(sd, load_image(item.image_path, SIZE), spec)


def test_the_shared_trajectory_run_equals_unshared_edits_with_the_reference_settings(root, sd, tmp_path):
    steps, methods = 5, (*P2P_PAIR, MASACTRL)  # MasaCtrl starts at step 4
    items = load_dataset(root).items
    records = run_items(sd, Registry(), items, methods, tmp_path, RunSettings((SIZE, SIZE), values={"steps": steps}))
    assert files_below(tmp_path, methods) == expected_outputs(methods)
    unshared_rows = 0
    for item in items:
        for method in methods:
            alone = unshared(sd, item, method, steps, blend=method in P2P_PAIR)  # P2P gets the blend words
            got = pixels(tmp_path / png_name(method, item.relative_path))
            np.testing.assert_array_equal(got, alone.edited, err_msg=f"{method} {item.id}")
            unshared_rows += alone.unet_rows["total"]
    # one DDIM pass per photo saved: directinversion+p2p took ddim+p2p's
    assert sum(r["unet_rows"]["total"] for r in records) == unshared_rows - steps * len(items)
    assert {r["trajectory"] for r in records if r["method"] == "directinversion+p2p"} == {"shared"}
    assert all(r["seed"] == 1234 and r["guidance"] == 7.5 and r["steps"] == steps for r in records)
    # the blend words matter: without them the cat -> dog edit is another picture
    cat = next(i for i in items if i.blend_words == ("cat", "dog"))
    plain = unshared(sd, cat, "ddim+p2p", steps, blend=False).edited
    assert not np.array_equal(plain, pixels(tmp_path / png_name("ddim+p2p", cat.relative_path)))


def jpeg_error(image: np.ndarray) -> float:
    """Mean absolute change of `image` by a JPEG round trip at the reference's quality (75)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=75)
    return float(np.abs(pixels(buffer) - image.astype(int)).mean())


def test_jpeg_mode_writes_the_reference_strip_its_evaluator_reads(root, sd, tmp_path):
    item = load_dataset(root, types=["1"]).items[0]
    run_items(sd, Registry(), [item], ("ddim+p2p",), tmp_path, RunSettings((SIZE, SIZE), EditFormat.JPEG, {"steps": 2}))
    path = tmp_path / "ddim+p2p" / "annotation_images" / item.relative_path  # the mapping file's own .jpg name
    assert find_edit(tmp_path, "ddim+p2p", item) == path
    with Image.open(path) as im:
        assert (im.format, im.size) == ("JPEG", (4 * SIZE, SIZE))
        q75 = io.BytesIO()
        Image.new("RGB", (8, 8)).save(q75, format="JPEG", quality=75)
        assert im.quantization == Image.open(q75).quantization  # PIL's default, the reference's .save()
    strip = pixels(path).astype(int)
    alone = unshared(sd, item, "ddim+p2p", 2, blend=True)
    panels = [load_image(item.image_path, SIZE), alone.reconstruction, alone.edited]
    for n, panel in enumerate(panels, start=1):  # [prompts | source | reconstruction | edit]
        errors = [np.abs(strip[:, n * SIZE : (n + 1) * SIZE] - p).mean() for p in panels]
        assert np.argmin(errors) == n - 1
        assert errors[n - 1] <= 1.1 * jpeg_error(panel) + 0.5  # no worse than the panel compressed alone
    assert (strip[:, :SIZE] < 128).any() and np.median(strip[:, :SIZE]) == 255  # text on white
    np.testing.assert_array_equal(read_edit(path, (SIZE, SIZE)), strip[:, -SIZE:])  # the scorer's crop


def test_a_failing_item_is_recorded_and_the_run_goes_on(tmp_path):
    entries = {**ENTRIES, "000000000001": ("0_random_140/000000000001.jpg", "0", "a cat", "a dog",
                                           "zebra dog", (0, 0, 10, 10))}
    data = make_root(tmp_path / "data", entries)
    runs = tmp_path / "runs"
    argv = ["eval", "run", "--model", "tiny-random", "--data", str(data), "--methods", "ddim+p2p", MASACTRL,
            "--types", "0", "--size", str(SIZE), "--steps", "5", "-o", str(runs), "--no-progress"]
    assert main(argv) == 1  # some job failed
    index = json.loads((runs / "index.json").read_text())
    failed = [e for e in index["entries"] if e["status"] == "failed"]
    assert [(e["method"], e["id"]) for e in failed] == [("ddim+p2p", "000000000001")]
    assert "zebra" in failed[0]["error"] and not (runs / failed[0]["path"]).exists()
    assert index["counts"]["ddim+p2p"] == {"edited": 1, "existing": 0, "failed": 1}
    assert index["counts"][MASACTRL] == {"edited": 2, "existing": 0, "failed": 0}  # no blend words: it runs
    assert [r["status"] for r in log_records(runs)].count("failed") == 1
    items = load_dataset(data, types=["0"]).items
    with pytest.raises(PromptError, match="zebra"):
        run_items(StableDiffusion.tiny_random(), Registry(), items, ("ddim+p2p",), tmp_path / "stop",
                  RunSettings((SIZE, SIZE), values={"steps": 2}, stop_on_error=True))


@pytest.mark.parametrize("method, data, message", [
    ("ddim+nope", None, "unknown editing method 'nope'"),
    ("null-text-inversion+pnp", None, "works with --inversion ddim or direct"),
    ("ddim+p2p", "missing", "no such benchmark folder"),
])
def test_bad_methods_and_data_are_one_line_errors_before_the_model_loads(root, tmp_path, method, data, message, capsys):
    argv = ["eval", "run", "--model", "no-such-model", "--data", str(tmp_path / data if data else root),
            "--methods", method, "-o", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start_run(root: Path, runs: Path, methods: tuple[str, ...], steps: int) -> subprocess.Popen:
    cmd = [sys.executable, "cli.py", "eval", "run", "--model", "tiny-random", "--data", str(root), "--methods",
           *methods, "--size", str(SIZE), "--steps", str(steps), "-o", str(runs), "--no-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_after_new_output(proc: subprocess.Popen, runs: Path, deadline: float = 120.0) -> None:
    """SIGKILL `proc` as soon as the logs gain a line (a job finished)."""
    seen, start = len(log_records(runs)), time.monotonic()
    while len(log_records(runs)) == seen:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() - start < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_run_killed_twice_resumes_with_every_output_exactly_once(root, tmp_path):
    methods, steps = P2P_PAIR, 12
    reference = tmp_path / "reference"
    done = start_run(root, reference, methods, steps)
    assert done.wait() == 0, done.communicate()[1].decode()[-2000:]
    runs = tmp_path / "runs"
    expected = expected_outputs(methods)
    for _ in range(2):
        proc = start_run(root, runs, methods, steps)
        kill_after_new_output(proc, runs)
        present = {name for name in files_below(runs, methods) if not Path(name).name.startswith(".")}
        assert present < expected  # killed midway: some outputs, not all
    for name in present:
        pixels(runs / name)  # whole
    before = {name: (runs / name).stat().st_mtime_ns for name in present}
    # a kill between writing a temporary and renaming it leaves this behind
    pending = sorted(expected - present)[0]
    stale = (runs / pending).parent / f".{Path(pending).name}.0123abcd.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\x89PNG half")
    last = start_run(root, runs, methods, steps)
    assert last.wait() == 0, last.communicate()[1].decode()[-2000:]
    assert files_below(runs, methods) == expected  # every output once, no temporary left
    for name in expected:
        np.testing.assert_array_equal(pixels(runs / name), pixels(reference / name), err_msg=name)
    assert {name: (runs / name).stat().st_mtime_ns for name in present} == before  # skipped, not redone
    index = json.loads((runs / "index.json").read_text())
    assert sorted(e["path"] for e in index["entries"]) == sorted(expected)
    assert {e["status"] for e in index["entries"] if e["path"] in present} == {"existing"}
    assert {e["status"] for e in index["entries"] if e["path"] not in present} == {"edited"}
    # each finished job's line survives a kill, except one killed in the instant between renaming
    # its output into place and appending its line
    logged = {r["path"] for r in log_records(runs) if r["status"] == "edited"}
    assert logged <= expected and len(expected - logged) <= 2
    assert expected - present <= logged  # the last run's jobs all logged


def test_two_torchrun_ranks_split_the_items_and_write_one_index(root, tmp_path):
    runs, methods = tmp_path / "runs", ("ddim+p2p", MASACTRL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "cli.py",
           "eval", "run", "--model", "tiny-random", "--data", str(root), "--methods", *methods,
           "--size", str(SIZE), "--steps", "5", "-o", str(runs), "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in runs.iterdir() if p.is_file()] == ["index.json"]
    index = json.loads((runs / "index.json").read_text())
    assert (index["world_size"], index["backend"]) == (2, "gloo")
    ids = list(ENTRIES)  # the mapping file's order
    for rank in (0, 1):
        mine = {e["id"] for e in index["entries"] if e["rank"] == rank}
        assert mine == set(ids[rank::2])
    assert sorted(e["path"] for e in index["entries"]) == sorted(expected_outputs(methods))  # no gap, no overlap
    assert files_below(runs, methods) == expected_outputs(methods)
    logs = sorted(p.name for p in (runs / "logs").iterdir())
    assert len(logs) == 2 and {name.split("-rank")[0] for name in logs} == {index["run_id"]}
