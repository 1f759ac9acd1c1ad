"""`invedit reconstruct`: invert a photo and denoise it back with its own prompt.

Reconstruction (target = source, no controller) is the first test of every inversion method:
load -> VAE encode -> invert -> the editing loop on the source rows only -> decode. Writes
reconstruction.png, grid.png (input | reconstruction), with --save-latents
latents/{z0,trajectory,final}.npy, and run.json last (parameters, versions, per-stage timings,
PSNR/MSE), the folder appearing whole when the run ends.
"""

from __future__ import annotations

import argparse

from evaluation.api import reconstruct
from evaluation.commands.common import (
    add_model_options,
    check_run_options,
    inversion_spec_of,
    load_model,
    model_section,
    read_image,
)
from evaluation.images import image_mse_psnr
from evaluation.options import add_method_options, add_run_options
from evaluation.outputs import RunDirectory, run_record
from evaluation.pictures import grid
from evaluation.registry import Registry
from evaluation.timing import StageTimer

DESCRIPTION = "Invert a photo and reconstruct it with its own prompt (the first test of an inversion method)."


def add_arguments(p: argparse.ArgumentParser, registry: Registry) -> None:
    p.description = DESCRIPTION
    add_model_options(p)
    p.add_argument("--prompt", required=True, help="the source prompt describing the photo")
    p.add_argument("--inversion", default="direct",
                   help=f"inversion method: {', '.join(m.name for m in registry.inversions)} (default: direct)")
    add_method_options(p, registry.inversions, "inversion")
    add_run_options(p)
    p.add_argument("--save-latents", action="store_true",
                   help="also write latents/z0.npy, latents/trajectory.npy and latents/final.npy")


def run(args: argparse.Namespace, registry: Registry) -> int:
    run_opts = check_run_options(args)
    spec = inversion_spec_of(args, registry)
    with RunDirectory(args.output) as out:
        timer = StageTimer()
        with timer("load_image"):
            photo, image_info = read_image(args.image, run_opts)  # before the model: a bad image writes nothing
        with timer("load_model"):
            sd = load_model(args, run_opts)
        result = reconstruct(sd, photo, spec, progress=run_opts.progress, timer=timer)
        z_final = result.latent.cpu()
        z0 = result.z0.cpu()
        mse, psnr = image_mse_psnr(photo, result.image)
        inversion = result.inversion
        metrics = {
            "psnr_db": psnr, "mse": mse,
            "latent_mse": float(((z_final - z0) ** 2).mean()),
            "latent_max_abs": float((z_final - z0).abs().max()),
            "unet_rows": dict(result.unet_rows),
            "inversion_cost": inversion.cost.as_dict(),
        }
        if inversion.losses is not None:
            metrics["final_loss_per_step"] = [l[-1] for l in inversion.losses]
        with timer("write"):
            out.png("reconstruction.png", result.image)
            out.png("grid.png", grid([photo, result.image], ["input", f"{spec.method.name} reconstruction, PSNR {psnr:.2f} dB"]))
            if args.save_latents:
                out.npy("latents/z0.npy", z0)
                out.npy("latents/trajectory.npy", inversion.trajectory)  # (steps+1, 1, 4, h, w)
                out.npy("latents/final.npy", z_final)
        params = {k: v for k, v in vars(args).items() if not k.startswith("setting:")}
        out.commit(run_record(
            "reconstruct", params, timer.as_dict(), metrics, image=image_info, model=model_section(args, sd),
            inversion={"method": inversion.method, "settings": dict(inversion.settings), "steps": spec.steps,
                       "guidance": spec.guidance},
        ))
    print(f"reconstruction ({spec.method.name}): PSNR {psnr:.2f} dB, MSE {mse:.2f}; wrote {args.output}")
    return 0
