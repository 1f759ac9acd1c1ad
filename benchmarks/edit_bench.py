"""`invedit bench edit`: one whole DirectInversion + P2P edit, ours against the diffusers baseline.

The same weights on both sides: the model is written once as a diffusers folder and converted into
ours (or a diffusers folder such as tests/data/tiny-sd is converted), so each side loads its own
files from disk. The same image, prompts, size, dtype and steps. Each side runs in its own child
process (`python -m benchmarks.edit_bench --child SPEC.json`), one after the other, so its peak
RSS is its own and not whatever ran first. In a child:

1. load (timed once: the first load of the process);
2. `warmup` untimed edits of `warmup_steps` steps (enough to page in the weights and build every
   kernel), then `repeats` timed edits of `steps`: wall time per stage (encode, inversion, edit,
   decode), the median of each reported;
3. memory, above the weights' own bytes (exact on both sides): on CUDA `max_memory_allocated` over
   the timed edits; on a CPU the process's peak RSS over them, and the peak of live tensor bytes
   during one more edit of `warmup_steps` watched by a dispatch-level tracker (every tensor storage
   an operator returns counted until freed, views of older tensors not; untimed, as the tracker
   slows the edit down; neither side's peak grows with the steps);
4. the agreement edit: the edit again, started from the trajectory of our fp32 inversion (a chaotic
   50-step guided loop amplifies any inversion difference, so agreement is measured from one
   inversion, as the oracle tests do).

Agreement (`edit_agreement`): relative RMS, RMS(ours - theirs) / RMS(theirs), of the final target
latents at most `TOLERANCE` (the oracle tests' tolerance), and our source at most that far from z0,
the exact answer of DirectInversion's source; the baseline's source is reported against z0 too.
bf16 (when asked, and by default on a CPU with bf16 units): our bf16 edit against our fp32 edit
from the same trajectory, judged against the yardstick of the same comparison made by the diffusers
baseline (its bf16 edit against its fp32 edit): ours may be at most `BF16_FACTOR` times as far, as
the kernel tests judge low-precision error.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.common import device_name, markdown_table, slug, write_results
from ldm.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE = REPO_ROOT / "tests" / "data" / "oracle" / "input.png"
SOURCE = "a round cake with orange frosting on a wooden plate"
TARGET = "a square cake with orange frosting on a wooden plate"
BLEND = ("cake", "cake")
TOLERANCE = 1e-2  # relative RMS per row, the oracle tests' tolerance
BF16_FACTOR = 2.0  # our bf16 error may be at most this many times the baseline's own bf16 error
STAGES = ("encode", "inversion", "edit", "decode")


@dataclass(frozen=True)
class ChildSpec:
    """What one child process measures."""

    side: str  # "ours" | "diffusers"
    model_dir: str  # our directory (ours) or a diffusers folder (diffusers)
    device: str
    dtype: str  # "fp32" | "fp16" | "bf16"
    size: int
    steps: int
    warmup: int
    repeats: int  # 0: agreement edit only
    warmup_steps: int  # steps of the warm-up edits and of the tracked edit
    track: bool  # CPU: the tensor-bytes tracker run
    trajectory: str | None  # .pt file with the fp32 trajectory to start the agreement edit from
    out: str  # .pt file the child writes


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages made by operators while active (weights, made before, are
    not counted). A storage is counted once, from the operator that returns it until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # a view (t(), reshape, an in-place op's return) shares its input's storage: a weight seen
        # through w.t() was not made by the edit
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key and key not in self.seen and key not in inputs:
                    self.seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def rss_bytes() -> int:
    """The process's resident set size now (Linux /proc), or 0 where unreadable."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The process's peak RSS since it started, or since `reset_peak_rss` (Linux VmHWM).

    Not getrusage's ru_maxrss: Linux carries that over fork and exec, so a child would report the
    parent's peak (here: the parent that wrote the weights, 6 GiB, on both sides alike)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: KiB, the best there is


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count at the current RSS (Linux: "5" into /proc/self/clear_refs);
    False where the kernel does not allow it, and the peak then counts from the process's start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rel_rms(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    a, b = ours.detach().double().cpu(), theirs.detach().double().cpu()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def agreement(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Relative RMS of each final latent row (source, target) and whether all are within tolerance."""
    per_row = [rel_rms(ours[i], theirs[i]) for i in range(theirs.shape[0])]
    return {"rel_rms": per_row, "tolerance": tolerance, "agree": all(e <= tolerance for e in per_row)}


def edit_agreement(ours: torch.Tensor, theirs: torch.Tensor, z0: torch.Tensor,
                   tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The gate of the ours-against-diffusers comparison, from one inversion: the edited rows (the
    targets) agree within tolerance, and our source row is DirectInversion's exact answer, z0 (the
    pin ends the source on L[0] = z0). ours, theirs: (2, 4, h, w) final latents; z0: (1, 4, h, w).

    The baseline's source is reported with its own distance from z0 but not gated: its offset form
    cancels its edit's drift only up to the rounding of its 2-row offset pass against its 4-row
    edit, which a guided 50-step loop on random full-width weights amplifies step by step (on the
    oracle's tiny model, tests/data/tiny-sd, it stayed within 2.7e-4 at 256 px and 10 steps)."""
    verdict = agreement(ours, theirs, tolerance)
    verdict["source_from_z0"] = {"ours": rel_rms(ours[0], z0[0]), "diffusers": rel_rms(theirs[0], z0[0])}
    verdict["agree"] = verdict["rel_rms"][1] <= tolerance and verdict["source_from_z0"]["ours"] <= tolerance
    return verdict


# --- the child ---------------------------------------------------------------------------------


def _ours(spec: ChildSpec, device: torch.device, dtype: torch.dtype, image: np.ndarray):
    from evaluation.api import edit
    from evaluation.registry import Registry
    from evaluation.timing import StageTimer
    from ldm.model import open_model

    start = time.perf_counter()
    sd = open_model(spec.model_dir, dtype, device)
    load_s = time.perf_counter() - start

    def run(trajectory: tuple[torch.Tensor, ...] | None = None, steps: int = spec.steps) -> dict[str, Any]:
        edit_spec = Registry().edit_spec("directinversion+p2p", source=SOURCE, target=TARGET, blend=BLEND, steps=steps)
        timer = StageTimer()
        result = edit(sd, image, edit_spec, timer=timer, trajectory=trajectory)
        times = dict(result.timings)
        times["inversion"] = times.pop("invert")
        return {"timings": times, "rows": dict(result.unet_rows), "latents": result.latents.float().cpu(),
                "trajectory": tuple(t.float().cpu() for t in result.inversion.trajectory)}

    return load_s, run, model_bytes(sd.text, sd.unet, sd.vae)


def _diffusers(spec: ChildSpec, device: torch.device, dtype: torch.dtype, image: np.ndarray):
    from benchmarks.diffusers_edit import Baseline, BaselineSpec, baseline_edit
    from ldm.tokenizer import Tokenizer

    start = time.perf_counter()
    baseline = Baseline.load(Path(spec.model_dir), device, dtype)
    load_s = time.perf_counter() - start
    tokenizer = Tokenizer.from_dir(Path(spec.model_dir) / "tokenizer")  # for the token bookkeeping only

    def run(trajectory: tuple[torch.Tensor, ...] | None = None, steps: int = spec.steps) -> dict[str, Any]:
        edit_spec = BaselineSpec(SOURCE, TARGET, BLEND, steps=steps)
        result = baseline_edit(baseline, image, edit_spec, tokenizer, None if trajectory is None else list(trajectory))
        return {"timings": result.timings, "rows": result.rows, "latents": result.latents.float().cpu(),
                "trajectory": tuple(t.float().cpu() for t in result.trajectory)}

    return load_s, run, model_bytes(baseline.text_encoder, baseline.unet, baseline.vae)


def model_bytes(*nets: torch.nn.Module) -> int:
    """Bytes of the networks' parameters and buffers: the weights, the same on both sides."""
    return sum(t.nbytes for net in nets for t in (*net.parameters(), *net.buffers()))


def child(spec: ChildSpec) -> None:
    from evaluation.images import load_image
    from ldm.model import DTYPES

    device, dtype = torch.device(spec.device), DTYPES[spec.dtype]
    torch.manual_seed(0)
    image = load_image(str(IMAGE), (spec.size, spec.size))
    load_s, run, weight_bytes = (_ours if spec.side == "ours" else _diffusers)(spec, device, dtype, image)
    rss_loaded = rss_bytes()
    record: dict[str, Any] = {"side": spec.side, "dtype": spec.dtype, "load_s": load_s}
    timed: list[dict[str, Any]] = []
    last = None
    if spec.repeats:
        for _ in range(spec.warmup):
            run(steps=spec.warmup_steps)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        peak_from_timed = reset_peak_rss()
        for _ in range(spec.repeats):
            last = run()
            timed.append(last["timings"])
        record["stages_s"] = {s: statistics.median(t[s] for t in timed) for s in STAGES}
        record["stage_runs_s"] = {s: [t[s] for t in timed] for s in STAGES}
        record["edit_s"] = statistics.median(sum(t[s] for s in STAGES) for t in timed)
        record["rows"] = last["rows"]
        memory: dict[str, Any] = {"weight_bytes": weight_bytes}
        if device.type == "cuda":
            memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            memory["cuda_above_weights_bytes"] = memory["cuda_max_allocated_bytes"] - weight_bytes
        else:
            # RSS right after loading says little: our weights are memory-mapped and paged in on
            # first use, the baseline's are read into memory; the weights' own size is exact on both
            memory["rss_after_load_bytes"] = rss_loaded
            memory["peak_rss_bytes"] = peak_rss_bytes()  # before the tracked run, which adds its own
            memory["peak_rss_over"] = "the timed edits" if peak_from_timed else "the whole process"
            memory["working_rss_bytes"] = memory["peak_rss_bytes"] - weight_bytes
            if spec.track:
                with LiveTensorBytes() as tracker:
                    run(steps=spec.warmup_steps)
                memory["tracked_peak_tensor_bytes"] = tracker.peak
        record["memory"] = memory
    tensors: dict[str, Any] = {}
    if last is not None:
        tensors["own_latents"] = last["latents"]
        tensors["trajectory"] = torch.stack(last["trajectory"])
    if spec.trajectory:
        start_from = tuple(torch.load(spec.trajectory)["trajectory"].to(device))
        tensors["agreement_latents"] = run(start_from)["latents"]
    torch.save({"record": record, **tensors}, spec.out)


# --- the parent --------------------------------------------------------------------------------


def prepare_weights(model: str, tmp: Path) -> tuple[Path, Path]:
    """(our directory, a diffusers folder) holding the same weights, under `tmp`.

    model: a diffusers folder (e.g. tests/data/tiny-sd); `tiny-random` / `tiny-random-sd2`; `sd14-random`
    (SD-1.4 widths, seeded random weights); or one of our converted directories."""
    from benchmarks.diffusers_nets import diffusers_folder
    from ldm.config import SD14
    from ldm.model import TINY_MODELS, StableDiffusion
    from weights.convert import convert

    ours, theirs = tmp / "ours", tmp / "diffusers"
    path = Path(model)
    if path.is_dir() and (path / "unet").is_dir():  # a diffusers folder
        convert(path, ours)
        return ours, path
    if model in TINY_MODELS or model == "sd14-random":
        config = SD14 if model == "sd14-random" else TINY_MODELS[model]
        diffusers_folder(StableDiffusion.tiny_random(config=config), theirs)
        convert(theirs, ours)
        return ours, theirs
    if (path / "config.json").is_file():  # ours
        diffusers_folder(StableDiffusion.load(path), theirs)
        ours.symlink_to(path.resolve())
        return ours, theirs
    raise UsageError(f"--model {model}: expected a diffusers folder, one of our model directories, "
                     "tiny-random, tiny-random-sd2 or sd14-random")


def run_child(spec: ChildSpec) -> dict[str, Any]:
    path = Path(spec.out).with_suffix(".json")
    path.write_text(json.dumps(asdict(spec)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "benchmarks.edit_bench", "--child", str(path)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench edit: the {spec.side} {spec.dtype} run failed:\n{done.stderr[-4000:]}")
    return torch.load(spec.out)


def cpu_has_bf16() -> bool:
    from ldm.model import fast_bf16

    return fast_bf16(torch.device("cpu"))


@dataclass(frozen=True)
class BenchOptions:
    model: str
    out: Path
    device: str
    dtype: str  # the precision both sides are compared in
    bf16: bool  # also time our bf16 against our own `dtype` run
    size: int
    steps: int
    warmup: int
    repeats: int
    warmup_steps: int  # steps of the warm-up edits and of the tracked edit


def _gib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def run_edit_bench(opts: BenchOptions) -> tuple[int, list[Path]]:
    """Run every side, write edit-<device>.json/.md into opts.out; returns (exit code, paths)."""
    device = torch.device(opts.device)
    cpu = device.type == "cpu"
    with tempfile.TemporaryDirectory(prefix="invedit-bench-edit-") as tmp_name:
        tmp = Path(tmp_name)
        ours_dir, theirs_dir = prepare_weights(opts.model, tmp)

        def spec(side: str, dtype: str, repeats: int, trajectory: Path | None, name: str) -> ChildSpec:
            return ChildSpec(side, str(ours_dir if side == "ours" else theirs_dir), opts.device, dtype, opts.size,
                             opts.steps, opts.warmup if repeats else 0, repeats, opts.warmup_steps, cpu and repeats > 0,
                             None if trajectory is None else str(trajectory), str(tmp / f"{name}.pt"))

        ours = run_child(spec("ours", opts.dtype, opts.repeats, None, "ours"))
        trajectory = tmp / "ours.pt"
        theirs = run_child(spec("diffusers", opts.dtype, opts.repeats, trajectory, "diffusers"))
        agree = edit_agreement(ours["own_latents"], theirs["agreement_latents"], ours["trajectory"][0])
        agree["inversion_zT_rel_rms"] = rel_rms(ours["trajectory"][-1], theirs["trajectory"][-1])
        payload: dict[str, Any] = {
            "what": "one DirectInversion + P2P refine + LocalBlend edit, ours (fused) against the diffusers baseline",
            "device": device_name(device), "model": opts.model, "size": opts.size, "steps": opts.steps,
            "dtype": opts.dtype, "warmup": opts.warmup, "warmup_steps": opts.warmup_steps, "repeats": opts.repeats,
            "torch": torch.__version__,
            "prompts": {"source": SOURCE, "target": TARGET, "blend": list(BLEND)},
            "ours": ours["record"], "diffusers": theirs["record"], "agreement": agree,
        }
        o, t = ours["record"], theirs["record"]
        ratios = {"edit_time": o["edit_s"] / t["edit_s"],
                  "rows": o["rows"]["total"] / t["rows"]["total"]}
        for key in ("cuda_max_allocated_bytes", "cuda_above_weights_bytes", "peak_rss_bytes", "working_rss_bytes",
                    "tracked_peak_tensor_bytes"):
            if key in o["memory"] and key in t["memory"] and t["memory"][key] > 0:
                ratios[key.removesuffix("_bytes")] = o["memory"][key] / t["memory"][key]
        payload["ours_over_diffusers"] = ratios
        ok = agree["agree"]
        if opts.bf16:
            low = run_child(spec("ours", "bf16", opts.repeats, trajectory, "ours-bf16"))
            yard = run_child(spec("diffusers", "bf16", 0, trajectory, "diffusers-bf16"))
            ours_err = agreement(low["agreement_latents"], ours["own_latents"])["rel_rms"]
            yard_err = agreement(yard["agreement_latents"], theirs["agreement_latents"])["rel_rms"]
            bf16_ok = all(e <= BF16_FACTOR * y + 1e-6 for e, y in zip(ours_err, yard_err))
            payload["bf16"] = {
                "ours": low["record"], "speedup_over_ours": o["edit_s"] / low["record"]["edit_s"],
                "rel_rms_vs_ours_fp32": ours_err, "diffusers_bf16_vs_fp32_rel_rms": yard_err,
                "factor": BF16_FACTOR, "agree": bf16_ok,
            }
            ok = ok and bf16_ok
    table = edit_table(payload)
    print(table)
    stem = f"edit-{'cpu' if cpu else slug(device_name(device))}"
    paths = list(write_results(opts.out, stem, payload, table))
    return (0 if ok else 1), paths


def edit_table(p: dict[str, Any]) -> str:
    o, t = p["ours"], p["diffusers"]
    head = (f"One DirectInversion + P2P edit (LocalBlend, PIE defaults), {p['model']} at {p['size']}x{p['size']} px, "
            f"{p['steps']} steps, {p['dtype']}, {p['device']}; median of {p['repeats']} after {p['warmup']} warm-up "
            f"({p.get('warmup_steps', p['steps'])} steps)\n\n")
    rows = []
    for stage in STAGES:
        a, b = o["stages_s"][stage], t["stages_s"][stage]
        rows.append([stage, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}"])
    rows.append(["**edit (encode to decode)**", f"{o['edit_s']:.2f}", f"{t['edit_s']:.2f}", f"**{o['edit_s'] / t['edit_s']:.2f}**"])
    rows.append(["load (once)", f"{o['load_s']:.2f}", f"{t['load_s']:.2f}", f"{o['load_s'] / t['load_s']:.2f}"])
    rows.append(["UNet rows", str(o["rows"]["total"]), str(t["rows"]["total"]), f"{o['rows']['total'] / t['rows']['total']:.2f}"])
    for key, label in (("weight_bytes", "weights GiB"), ("cuda_max_allocated_bytes", "CUDA max allocated GiB"),
                       ("cuda_above_weights_bytes", "CUDA max allocated above the weights GiB"),
                       ("peak_rss_bytes", "peak RSS GiB"), ("working_rss_bytes", "peak RSS above the weights GiB"),
                       ("tracked_peak_tensor_bytes", "peak live tensors made by the edit GiB")):
        if key in o["memory"]:
            a, b = o["memory"][key], t["memory"][key]
            rows.append([label, _gib(a), _gib(b), f"{a / b:.2f}" if b else ""])
    a = p["agreement"]
    text = head + markdown_table(["stage", "ours s", "diffusers s", "ours/diffusers"], rows)
    z = a["source_from_z0"]
    text += (f"\n\nAgreement from one inversion (relative RMS of the final latents): targets {a['rel_rms'][1]:.1e} apart "
             f"(tolerance {a['tolerance']:g}); sources from z0, DirectInversion's exact answer: ours {z['ours']:.1e}, "
             f"diffusers {z['diffusers']:.1e} (the two sources {a['rel_rms'][0]:.1e} apart): "
             f"{'agree' if a['agree'] else 'DISAGREE'}; the two inversions' z_T differ by {a['inversion_zT_rel_rms']:.1e}.")
    if "bf16" in p:
        b = p["bf16"]
        low = b["ours"]
        text += (f"\n\nOurs in bf16: edit {low['edit_s']:.2f} s, {b['speedup_over_ours']:.2f}x our {p['dtype']} "
                 f"(stages: " + ", ".join(f"{s} {low['stages_s'][s]:.2f}" for s in STAGES) + "); against our "
                 f"{p['dtype']} edit from the same inversion: {b['rel_rms_vs_ours_fp32'][0]:.1e} / "
                 f"{b['rel_rms_vs_ours_fp32'][1]:.1e}; the baseline's own bf16 vs {p['dtype']}: "
                 f"{b['diffusers_bf16_vs_fp32_rel_rms'][0]:.1e} / {b['diffusers_bf16_vs_fp32_rel_rms'][1]:.1e} "
                 f"(allowed: {b['factor']:g}x): {'agree' if b['agree'] else 'DISAGREE'}.")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a child run of invedit bench edit")
    parser.add_argument("--child", type=Path, required=True)
    args = parser.parse_args(argv)
    child(ChildSpec(**json.loads(args.child.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
