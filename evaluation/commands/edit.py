"""`invedit edit`: invert a photo and edit it under one or more target prompts.

Options are generated from the registry: `--inversion NAME` and `--control NAME` (or one
`--method INVERSION+EDIT`, the reference's names such as directinversion+p2p), each method's own
options, and the run options. The photo is inverted once; every `--target` is an edit of that one
inversion. `--inversion-file` starts from an inversion written earlier (`invedit invert`,
`--save-inversion`), so nothing is inverted at all.

Writes into OUT (one subfolder per target when there are several): edited.png, grid.png (source |
reconstruction | edit, prompts underneath), attention.png (the target's cross-attention map per
word as a heat map over the photo), with --save-latents latents/{trajectory,final}.npy, and
run.json last; the folder appears whole when the run ends (evaluation/outputs.py).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from control.words import word_positions
from evaluation.api import EditResult, EditSpec, edit, plan_edit
from evaluation.commands.common import (
    add_model_options,
    check_output_file,
    check_run_options,
    load_model,
    model_section,
    read_image,
)
from evaluation.inversion_file import InversionFile, check_file_prompt, edit_inversion_from_file, save_inversion
from evaluation.options import add_method_options, add_run_options, build_settings, refuse_foreign_options
from evaluation.outputs import RunDirectory, run_record
from evaluation.pictures import attention_sheet, grid
from evaluation.registry import Choice, PairChoice, Registry
from evaluation.timing import StageTimer
from ldm.model import model_facts

DESCRIPTION = "Invert a photo and edit it: the source prompt describes the photo, each --target an edit."


def add_arguments(p: argparse.ArgumentParser, registry: Registry) -> None:
    p.description = DESCRIPTION
    add_model_options(p)
    p.add_argument("--source", required=True, help="prompt describing the photo ([ ] markers are removed, as PIE-Bench's)")
    p.add_argument("--target", required=True, action="append",
                   help="prompt describing the edit; repeat for several edits of one inversion")
    names = p.add_argument_group("methods")
    names.add_argument("--inversion", help=f"inversion method: {', '.join(m.name for m in registry.inversions)} "
                       "(default: direct, or the inversion file's)")
    names.add_argument("--control", help=f"editing method: {', '.join(m.name for m in registry.edits)} (default: p2p)")
    names.add_argument("--method", metavar="INVERSION+EDIT",
                       help="both at once by the reference's names, e.g. directinversion+p2p, "
                            "null-text-inversion+proximal-guidance (see `invedit methods`)")
    names.add_argument("--inversion-file", metavar="PATH",
                       help="start from an inversion written earlier (invedit invert, --save-inversion) instead of inverting")
    names.add_argument("--save-inversion", metavar="PATH", help="also write the inversion to PATH (.safetensors)")
    add_method_options(p, registry.inversions, "inversion")
    add_method_options(p, registry.edits, "editing method")
    add_run_options(p)
    p.add_argument("--save-latents", action="store_true",
                   help="also write latents/trajectory.npy (z0..z_T) and latents/final.npy ([source, target])")


def choose_methods(args: argparse.Namespace, registry: Registry, file: InversionFile | None) -> PairChoice:
    """The methods named on the command line; with an inversion file and no inversion named, the file's."""
    if args.method is None and args.inversion is None and file is not None and file.method is not None:
        inv = registry.inversion(file.method)
        inv = Choice(inv.method, {**file.settings, **inv.settings}, inv.run)
        return PairChoice(inv, registry.edit(args.control or "p2p"))
    return registry.choose(args.method, args.inversion, args.control)


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "target"


def write_edit(out: RunDirectory, prefix: str, result: EditResult, photo: Any, words: list[tuple[str, list[int]]],
               save_latents: bool) -> None:
    spec = result.spec
    out.png(prefix + "edited.png", result.edited)
    inv_prompt = result.inversion_prompt or '""'
    out.png(prefix + "grid.png", grid([photo, result.reconstruction, result.edited], [
        f"source: {spec.prompts.source}", f"reconstruction ({spec.inversion.name}, {inv_prompt})",
        f"edit ({spec.method.name}): {spec.prompts.target}"]))
    if result.attention is not None:
        sheet = attention_sheet(photo, result.attention, words)
        if sheet is not None:
            out.png(prefix + "attention.png", sheet)
    if save_latents:
        out.npy(prefix + "latents/trajectory.npy", result.inversion.trajectory)  # (steps+1, 1, 4, h, w)
        out.npy(prefix + "latents/final.npy", result.latents)  # (2, 4, h, w): source, target


def metrics_of(result: EditResult) -> dict[str, Any]:
    final = result.latents.cpu()
    z0 = result.z0.cpu()[0]
    return {
        "unet_rows": dict(result.unet_rows),
        "inversion_cost": result.inversion.cost.as_dict(),
        "sites_touched": len(result.sites),
        "sites": list(result.sites),
        "target_vs_source_latent_rms": float((final[1] - final[0]).pow(2).mean().sqrt()),
        "source_vs_input_latent_rms": float((final[0] - z0).pow(2).mean().sqrt()),
    }


def run(args: argparse.Namespace, registry: Registry) -> int:
    run_opts = check_run_options(args)
    file = InversionFile.read(args.inversion_file) if args.inversion_file else None
    choice = choose_methods(args, registry, file)
    refuse_foreign_options(args, registry, [choice.inversion.method.name, choice.edit.method.name])
    steps = args.steps or (file.steps if file is not None else 50)
    run_values = {"steps": steps, "guidance": args.guidance, "seed": args.seed, **choice.run}
    specs = [
        EditSpec(args.source, target, choice.inversion.method, build_settings(args, choice.inversion),
                 choice.edit.method, build_settings(args, choice.edit), **run_values)
        for target in args.target
    ]
    facts = model_facts(args.model)  # prompts, words and layer choices checked before any weight is read
    plans = [plan_edit(facts, spec) for spec in specs]
    if file is not None:
        check_file_prompt(file, plans[0].inversion_prompt)  # before any weight is loaded
    save_path = check_output_file(args.save_inversion, ".safetensors") if args.save_inversion else None
    with RunDirectory(args.output) as out:
        timer = StageTimer()
        with timer("load_image"):
            photo, image_info = read_image(args.image, run_opts)
        with timer("load_model"):
            sd = load_model(args, run_opts)
        inversion = None
        if file is not None:
            with timer("read_inversion"):
                inversion = edit_inversion_from_file(sd, photo, specs[0], file, registry)
        results = []
        for spec in specs:
            result = edit(sd, photo, spec, inversion=inversion, progress=run_opts.progress, timer=StageTimer())
            inversion = result.inversion  # invert once, edit many times
            results.append(result)
        if save_path is not None:
            with timer("save_inversion"):
                save_inversion(save_path, inversion, prompt=plans[0].inversion_prompt, guidance=args.guidance,
                               info={"image_sha256": image_info["sha256"], "image_size": "x".join(map(str, run_opts.size)),
                                     "model": args.model})
        with timer("write"):
            many = len(results) > 1
            edits = []
            for k, result in enumerate(results):
                prefix = f"{k + 1:02d}-{slug(result.prompts.target)}/" if many else ""
                target = result.prompts.target
                words = [(w, word_positions(sd.tokenizer, target, i)) for i, w in enumerate(target.split(" "))]
                write_edit(out, prefix, result, photo, words, args.save_latents)
                edits.append({"folder": prefix or ".", "target": target, "words": words,  # token positions, BOS = 0
                              "timings_s": dict(result.timings), "metrics": metrics_of(result)})
        params = {k: v for k, v in vars(args).items() if not k.startswith("setting:")}
        stages = {**timer.as_dict()}
        stages.pop("total")
        if not many:  # one edit: its stages beside the command's, one total
            stages.update({k: v for k, v in results[0].timings.items() if k != "total"})
        stages["total"] = round(sum(stages.values()), 4)
        record = run_record(
            "edit", params, stages, edits[0]["metrics"] if not many else {"targets": len(results)},
            spec=results[0].spec.as_dict(), image=image_info, model=model_section(args, sd),
            inversion={"method": inversion.method, "settings": dict(inversion.settings),
                       "cost": inversion.cost.as_dict(), "from_file": str(file.path) if file is not None else None},
            edits=edits,
        )
        out.commit(record)
    for result in results:
        print(f"edit {result.spec.name} ({result.prompts.target!r}): {len(result.sites)} attention/feature sites "
              f"edited, {result.unet_rows['total']} UNet row evaluations")
    print(f"wrote {args.output}")
    return 0
