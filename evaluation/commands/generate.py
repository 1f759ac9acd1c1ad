"""`invedit generate`: text to image with deterministic DDIM (evaluation/generation.py).

Writes into OUT: image-01.png, image-02.png, ... (one per --num-images), grid.png (every image,
its seed and index underneath) and run.json last; the folder appears whole when the run ends
(evaluation/outputs.py). The same checks as every run command come before any weight is loaded:
prompts over 75 tokens, a size that is not a multiple of 64, an output folder that cannot be
written, a device this machine lacks.
"""

from __future__ import annotations

import argparse

from control.words import token_ids
from evaluation.commands.common import check_run_options, load_model, model_section
from evaluation.generation import generate, start_noise
from evaluation.options import add_run_options
from evaluation.outputs import RunDirectory, run_record
from evaluation.pictures import grid
from evaluation.registry import Registry
from evaluation.timing import StageTimer
from ldm.errors import PromptError, UsageError
from ldm.model import TINY_MODELS, model_facts

DESCRIPTION = "Make pictures from a prompt: DDIM (eta 0) on the editing code's grid, classifier-free guidance."
MAX_IMAGES = 64


def add_arguments(p: argparse.ArgumentParser, registry: Registry) -> None:
    p.description = DESCRIPTION
    p.add_argument("--model", required=True, help="converted model directory (invedit convert), or a random-weight "
                   f"test model: {', '.join(TINY_MODELS)}")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative", default="", help="negative prompt, on the guidance's uncond row (default: none)")
    p.add_argument("--num-images", type=int, default=1, metavar="N",
                   help=f"images from one seed's noise, 1..{MAX_IMAGES} (default: 1)")
    add_run_options(p)


def run(args: argparse.Namespace, registry: Registry) -> int:
    run_opts = check_run_options(args)
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise UsageError(f"--num-images {args.num_images}: expected 1..{MAX_IMAGES}")
    tokenizer = model_facts(args.model).tokenizer  # prompts checked before any weight is read
    for flag, text in (("--prompt", args.prompt), ("--negative", args.negative)):
        try:
            token_ids(tokenizer, text)
        except PromptError as err:
            raise PromptError(f"{flag}: {err}") from None
    steps = args.steps or 50
    with RunDirectory(args.output) as out:
        timer = StageTimer()
        with timer("load_model"):
            sd = load_model(args, run_opts)
        z_T = start_noise(args.seed, args.num_images, run_opts.size, sd.config.unet.in_channels,
                          sd.config.vae.downsample_factor)
        result = generate(sd, args.prompt, z_T, negative=args.negative, steps=steps, guidance=args.guidance,
                          progress=run_opts.progress, timer=timer)
        with timer("write"):
            names = [f"image-{k + 1:02d}.png" for k in range(args.num_images)]
            for name, image in zip(names, result.images):
                out.png(name, image)
            out.png("grid.png", grid(list(result.images), [f"seed {args.seed}, image {k + 1}" for k in range(len(names))],
                                     columns=min(len(names), 4)))
        params = {**vars(args), "steps": steps}
        record = run_record("generate", params, timer.as_dict(), {"unet_rows": result.unet_rows, "images": names},
                            model=model_section(args, sd), size=list(run_opts.size))
        out.commit(record)
    print(f"generate: {args.num_images} image(s), {result.unet_rows} UNet row evaluations")
    print(f"wrote {args.output}")
    return 0
