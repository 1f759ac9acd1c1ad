"""The benchmark runner's work: every (photo, method) of this process's items, edited as the
reference's runners edit them, written where the scorer reads, resumably.

Per item, as cure-lab/PnPInversion's run_editing_*.py do: the cleaned prompts, seed 1234 (ours
travels in the EditSpec to the methods that draw random numbers; nothing touches the global RNG),
50 DDIM steps and guidance 7.5 unless the method's name implies others (`invedit methods`), and for
the methods that take blend words (Prompt-to-Prompt's `blend`) the item's `blended_word`, which
P2P also turns into a x2 reweight of the target word, as the reference passes `eq_params`. Methods
without such a setting (MasaCtrl, Plug-and-Play) get none, as their reference runners pass none.

Work shared without changing a result: the photo is read once per item, and the DDIM trajectory
of the photo is computed once per item for all the methods that start from it
(`InversionMethod.ddim_trajectory`) and embed the same texts in the same order (`edit_texts`):
those get bit-identical inputs, so the trajectory they would each compute is the one computed
once. Methods whose text batch differs (another editor) compute their own, because a text
encoder batch of another size may round differently on a GPU.

Resuming: an output that exists is complete (layout.write_edit renames a finished temporary into
place), so a job whose output exists is skipped unless `rerun`; temporaries a killed run left
behind are removed first. A failing job is recorded (its error in the record, no output) and the
run goes on, unless `stop_on_error`.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from control.method import EditPlan
from evaluation.api import (EditResult, EditSpec, edit, edit_inputs, edit_texts, inversion_task, plan_edit,
                            resolve_spec)
from evaluation.images import load_image
from evaluation.pie.dataset import PieItem
from evaluation.pie.layout import EditFormat, check_method, edit_path, write_edit
from evaluation.pie.strip import reference_strip
from evaluation.registry import Registry
from evaluation.timing import StageTimer
from inversion.ddim import ddim_trajectory
from ldm.errors import InveditError
from ldm.files import leftover_temps
from ldm.model import StableDiffusion
from samplers.settings import setting_fields

BLEND_SETTING = "blend"  # the editing-method setting that receives an item's blend words

Record = dict[str, Any]


@dataclass(frozen=True)
class RunSettings:
    """What every job of a run shares. `values`: steps / guidance / seed for the spec; a value the
    method's name implies wins over these (as in `invedit edit`)."""

    size: tuple[int, int]
    fmt: EditFormat = EditFormat.PNG
    values: Mapping[str, Any] = field(default_factory=dict)
    rerun: bool = False
    stop_on_error: bool = False
    run_id: str = ""
    rank: int = 0


def check_methods(registry: Registry, names: Sequence[str]) -> tuple[str, ...]:
    """The method names, each resolved and usable as a folder name, in order, duplicates dropped;
    an unknown name or an impossible pair is a UsageError before any weight is loaded."""
    methods = tuple(dict.fromkeys(names))
    for name in methods:
        check_method(name)
        registry.edit_spec(name, source="a photo", target="a photo")  # refuses impossible pairs
    return methods


def takes_blend(registry: Registry, method: str) -> bool:
    return any(f.name == BLEND_SETTING for f in setting_fields(registry.pair(method).edit.method.settings))


def item_spec(registry: Registry, method: str, item: PieItem, values: Mapping[str, Any]) -> EditSpec:
    """The EditSpec of `method` on `item`: its prompts, the run values the name does not imply, and
    the item's blend words for a method that takes them (None when the item has none)."""
    implied = registry.pair(method).run
    run = {k: v for k, v in values.items() if k not in implied}
    blend = {BLEND_SETTING: item.blend_words} if takes_blend(registry, method) else {}
    return registry.edit_spec(method, source=item.source_prompt, target=item.target_prompt, **run, **blend)


def trajectory_key(spec: EditSpec, plan: EditPlan) -> tuple[Any, ...]:
    """Edits with equal keys compute bit-identical DDIM trajectories of a photo."""
    return plan.inversion_prompt, edit_texts(spec, plan), spec.steps


def edit_trajectory(sd: StableDiffusion, image: np.ndarray, spec: EditSpec, plan: EditPlan) -> tuple[Tensor, ...]:
    """The DDIM trajectory `edit(sd, image, spec)` would compute: same z0, same embeddings, same grid."""
    z0, embeddings = edit_inputs(sd, image, spec, plan)
    return ddim_trajectory(sd, inversion_task(spec.inversion_spec(plan), z0, embeddings, image=None))


def output_picture(item: PieItem, image: np.ndarray, result: EditResult, fmt: EditFormat) -> np.ndarray:
    """The edit alone (PNG), or the reference's 4-panel strip (its JPEG mode)."""
    if fmt is EditFormat.PNG:
        return result.edited
    return reference_strip(item.source_prompt, item.target_prompt, image, result.reconstruction, result.edited)


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ItemRunner:
    """Runs the pending methods of one item: the photo read once, trajectories shared."""

    def __init__(self, sd: StableDiffusion, registry: Registry, runs: Path, settings: RunSettings) -> None:
        self.sd, self.registry, self.runs, self.settings = sd, registry, runs, settings

    def record(self, item: PieItem, method: str, status: str, **fields: Any) -> Record:
        path = edit_path(self.runs, method, item, self.settings.fmt)
        return {"run": self.settings.run_id, "rank": self.settings.rank, "method": method, "id": item.id,
                "path": path.relative_to(self.runs).as_posix(), "status": status, **fields}

    def run(self, item: PieItem, methods: Sequence[str], report: Callable[[Record], None]) -> None:
        """Edit `item` with each of `methods` (all pending), calling `report` once per job."""
        timer = StageTimer()
        try:
            with timer("load_image"):
                image = load_image(item.image_path, self.settings.size, orient=False)  # pixels as stored, as the reference reads PIE-Bench
        except Exception as err:  # every method of the item fails the same way; the run goes on
            if self.settings.stop_on_error:
                raise
            for method in methods:
                report(self.failed(item, method, err, timer))
            return
        shared: dict[tuple[Any, ...], tuple[Tensor, ...]] = {}
        for method in methods:
            report(self.job(item, method, image, shared, timer))
            timer = StageTimer()

    def job(self, item: PieItem, method: str, image: np.ndarray, shared: dict[tuple[Any, ...], tuple[Tensor, ...]],
            timer: StageTimer) -> Record:
        s = self.settings
        spec = None
        try:
            spec = resolve_spec(item_spec(self.registry, method, item, s.values), image)  # e.g. a BLIP caption
            plan = plan_edit(self.sd, spec)
            trajectory, rows, origin = None, {}, "own"
            if spec.inversion.ddim_trajectory:
                key = trajectory_key(spec, plan)
                origin = "shared" if key in shared else "computed"
                if key not in shared:
                    with timer("trajectory"):
                        shared[key] = edit_trajectory(self.sd, image, spec, plan)
                    rows["trajectory"] = spec.steps
                trajectory = shared[key]
            result = edit(self.sd, image, spec, trajectory=trajectory, timer=timer)
            picture = output_picture(item, image, result, s.fmt)
            with timer("write"):
                write_edit(edit_path(self.runs, method, item, s.fmt), picture, s.fmt)
        except Exception as err:
            if s.stop_on_error:
                raise
            return self.failed(item, method, err, timer, spec)
        rows.update((k, v) for k, v in result.unet_rows.items() if k != "total")
        return self.record(item, method, "edited", **run_values(spec), trajectory=origin,
                           unet_rows={**rows, "total": sum(rows.values())}, timings_s=timer.as_dict(),
                           finished_utc=now_utc())

    def failed(self, item: PieItem, method: str, err: Exception, timer: StageTimer,
               spec: EditSpec | None = None) -> Record:
        values = run_values(spec) if spec is not None else {}
        # a user-facing error (a blend word not in the prompt, an unreadable photo) is its message;
        # anything else also keeps where it happened
        where = {} if isinstance(err, InveditError) else {"traceback": traceback.format_exc(limit=-4)}
        return self.record(item, method, "failed", **values, error=f"{type(err).__name__}: {err}", **where,
                           timings_s=timer.as_dict(), finished_utc=now_utc())


def run_values(spec: EditSpec) -> dict[str, Any]:
    return {"seed": spec.seed, "steps": spec.steps, "guidance": spec.guidance}


def pending_methods(runs: Path, item: PieItem, methods: Sequence[str], settings: RunSettings) -> list[str]:
    """The methods whose output of `item` is still to be written (all of them with `rerun`)."""
    return [m for m in methods if settings.rerun or not edit_path(runs, m, item, settings.fmt).is_file()]


def remove_leftovers(runs: Path, items: Sequence[PieItem], methods: Sequence[str], fmt: EditFormat) -> int:
    """Delete the temporaries a killed run left beside this process's outputs; how many."""
    count = 0
    for item in items:
        for method in methods:
            for tmp in leftover_temps(edit_path(runs, method, item, fmt)):
                tmp.unlink(missing_ok=True)
                count += 1
    return count


def run_items(sd: StableDiffusion, registry: Registry, items: Sequence[PieItem], methods: Sequence[str], runs: Path,
              settings: RunSettings, *, log: Callable[[Record], None] = lambda r: None,
              progress: bool = False) -> list[Record]:
    """Edit `items` with `methods` into RUNS; one record per (item, method): edited, failed, or
    existing (skipped). `log` sees each edited or failed record as soon as it is written."""
    removed = remove_leftovers(runs, items, methods, settings.fmt)
    if removed:
        tqdm.write(f"removed {removed} unfinished file(s) a stopped run left in {runs}")
    todo = [(item, pending_methods(runs, item, methods, settings)) for item in items]
    runner = ItemRunner(sd, registry, runs, settings)
    records: list[Record] = []
    bar = tqdm(total=sum(len(p) for _, p in todo), desc=f"rank {settings.rank}" if settings.rank else "edits",
               unit="edit", disable=not progress, dynamic_ncols=True)
    failures = 0

    def report(record: Record) -> None:
        nonlocal failures
        log(record)
        records.append(record)
        if record["status"] == "failed":
            failures += 1
            bar.write(f"failed: {record['method']} {record['id']}: {record['error']}")
            bar.set_postfix(failed=failures)
        bar.update()

    with bar:
        for item, pending in todo:
            for method in methods:
                if method not in pending:
                    records.append(runner.record(item, method, "existing"))
            if pending:
                runner.run(item, pending, report)
    return records
