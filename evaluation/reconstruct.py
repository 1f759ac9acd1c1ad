"""`invedit reconstruct`: invert a real image and denoise it back with its own prompt.

Reconstruction (target = source, no controller) is the first test of every inversion method
(DESIGN.md §4): load -> VAE encode -> invert (ddim | direct | negative-prompt | null-text) ->
the editing loop on the source rows only -> decode. Writes OUT/reconstruction.png, OUT/grid.png
(input | reconstruction), with --save-latents OUT/latents/{z0,trajectory,final}.npy, and last
OUT/run.json (parameters, versions, per-stage timings, PSNR/MSE), every file atomically.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Callable

import torch

from evaluation.options import add_run_options, check_run_options
from evaluation.outputs import StageTimer, grid, image_mse_psnr, run_record, save_npy, save_png, write_run_json
from inversion.ddim import InversionConfig, invert_ddim
from inversion.direct import DirectConfig, invert_direct
from inversion.negative_prompt import NegativePromptConfig, invert_negative_prompt
from inversion.null_text import NullTextConfig, invert_null_text
from ldm.context import BatchLayout
from ldm.errors import ArgumentParser
from ldm.image import decode, encode, load_image
from samplers.loop import denoise
from samplers.trajectory import Inversion

METHODS = ("ddim", "direct", "negative-prompt", "null-text")


def invert(
    method: str, sd: torch.nn.Module, z0: torch.Tensor, c_null: torch.Tensor, c_src: torch.Tensor, args: argparse.Namespace
) -> tuple[Inversion, object]:
    """Run one inversion method with the CLI's settings; returns it and its config (for run.json)."""
    common = dict(steps=args.steps, guidance=args.guidance, progress=not args.no_progress)
    runs: dict[str, tuple[Callable[..., Inversion], object]] = {
        "ddim": (invert_ddim, InversionConfig(**common)),
        "direct": (invert_direct, DirectConfig(**common, form=args.direct_form)),
        "negative-prompt": (invert_negative_prompt, NegativePromptConfig(**common)),
        "null-text": (invert_null_text, NullTextConfig(**common)),
    }
    fn, cfg = runs[method]
    if method == "direct":  # its offsets must be recorded with the loop's own uncond tensor
        return invert_direct(sd, z0, c_src, cfg, c_null=c_null), cfg  # type: ignore[arg-type]
    return fn(sd, z0, c_src, cfg), cfg


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="invedit reconstruct", description="Invert an image and reconstruct it with its prompt.")
    p.add_argument("--model", required=True, help="converted model directory, or tiny-random")
    p.add_argument("--image", required=True, help="input image (any format PIL reads)")
    p.add_argument("--prompt", required=True, help="the source prompt describing the image")
    p.add_argument("--inversion", choices=METHODS, default="direct")
    p.add_argument("--direct-form", choices=("fused", "offset"), default="fused",
                   help="DirectInversion: correct in the loop (fused) or the reference's separate offset pass")
    add_run_options(p)
    return p


def main(argv: list[str]) -> int:
    from ldm.model import open_model

    args = parser().parse_args(argv)
    run = check_run_options(args)
    out, size = run.output, run.size
    timer = StageTimer()
    with timer("load_image"):
        image = load_image(args.image, size)  # before the model: a bad image fails fast, writes nothing
    with timer("load_model"):
        sd = open_model(args.model, run.dtype, args.device)
    with timer("encode"):
        z0 = encode(sd, image)
        c_null, c_src = sd.embed(["", args.prompt]).split(1)
    with timer("invert"):
        inversion, cfg = invert(args.inversion, sd, z0, c_null, c_src, args)
    with timer("denoise"):
        result = denoise(
            sd, None, torch.cat([c_null, c_src]), BatchLayout.cfg(("source",)), None, args.guidance, inversion,
            progress=not args.no_progress, desc="reconstruct",
        )
    with timer("decode"):
        recon = decode(sd, result.latents)[0]
    z_final = result.latents.cpu()
    mse, psnr = image_mse_psnr(image, recon)
    metrics = {
        "psnr_db": psnr,
        "mse": mse,
        "latent_mse": float(((z_final - z0.cpu()) ** 2).mean()),
        "latent_max_abs": float((z_final - z0.cpu()).abs().max()),
        "unet_rows_inversion": inversion.unet_rows,
        "unet_rows_denoise": result.unet_rows,
    }
    if inversion.losses is not None:
        metrics["null_text_inner_steps"] = [len(l) for l in inversion.losses]
        metrics["null_text_final_loss"] = [l[-1] for l in inversion.losses]
    with timer("write"):
        save_png(out / "reconstruction.png", recon)
        caption = f"{args.inversion} reconstruction, PSNR {psnr:.2f} dB"
        save_png(out / "grid.png", grid([image, recon], ["input", caption]))
        if args.save_latents:
            save_npy(out / "latents" / "z0.npy", z0)
            save_npy(out / "latents" / "trajectory.npy", inversion.trajectory)  # (steps+1, 1, 4, h, w)
            save_npy(out / "latents" / "final.npy", z_final)
    params = {k: v for k, v in vars(args).items()}
    params["size"] = list(size)
    record = run_record("reconstruct", params, timer.as_dict(), metrics, inversion_config=asdict(cfg),  # type: ignore[call-overload]
                        model={"spec": args.model, "dtype": str(sd.dtype), "device": str(sd.device)})
    write_run_json(out / "run.json", record)  # last: its presence marks a complete run
    print(f"reconstruction ({args.inversion}): PSNR {psnr:.2f} dB, MSE {mse:.2f}; wrote {out}")
    return 0
