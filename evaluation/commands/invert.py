"""`invedit invert`: invert a photo once and write the inversion to a file, to edit it many times.

The file (docs/methods/inversion-files.md) holds the trajectory z0..z_T, the method's per-step
state (null-text's embeddings, DirectInversion's offsets) and, as metadata, the method, its
settings, the grid, the guidance, the prompt, the image's size and hash; `invedit edit
--inversion-file FILE` starts from it without inverting again.
"""

from __future__ import annotations

import argparse

from control.words import strip_brackets
from evaluation.api import invert
from evaluation.commands.common import (
    add_model_options,
    check_output_file,
    check_run_options,
    inversion_spec_of,
    load_model,
    read_image,
)
from evaluation.inversion_file import save_inversion
from evaluation.options import add_method_options, add_run_options
from evaluation.registry import Registry
from evaluation.timing import StageTimer

DESCRIPTION = "Invert a photo and write the inversion to a .safetensors file (edit it later with --inversion-file)."


def add_arguments(p: argparse.ArgumentParser, registry: Registry) -> None:
    p.description = DESCRIPTION
    add_model_options(p)
    p.add_argument("--prompt", required=True,
                   help="the prompt to invert with: the edit's source prompt (MasaCtrl inverts with \"\")")
    p.add_argument("--target", help="the edit's target prompt, for methods that record in the edit's batch "
                   "(DirectInversion's offset form); optional")
    p.add_argument("--inversion", default="direct",
                   help=f"inversion method: {', '.join(m.name for m in registry.inversions)} (default: direct)")
    add_method_options(p, registry.inversions, "inversion")
    add_run_options(p, output="the inversion file to write (.safetensors)")


def run(args: argparse.Namespace, registry: Registry) -> int:
    run_opts = check_run_options(args)
    spec = inversion_spec_of(args, registry)
    path = check_output_file(args.output, ".safetensors")
    timer = StageTimer()
    with timer("load_image"):
        photo, image_info = read_image(args.image, run_opts)
    with timer("load_model"):
        sd = load_model(args, run_opts)
    inversion = invert(sd, photo, spec, target=args.target, progress=run_opts.progress, timer=timer)
    with timer("write"):
        save_inversion(path, inversion, prompt=strip_brackets(args.prompt), guidance=spec.guidance, info={
            "image_sha256": image_info["sha256"], "image_size": "x".join(map(str, run_opts.size)), "model": args.model,
            "unet_rows": inversion.cost.unet_rows, "seconds": timer.as_dict()["total"],
        })
    print(f"inversion ({spec.method.name}, {spec.steps} steps, {inversion.cost.unet_rows} UNet rows): wrote {path}")
    return 0
