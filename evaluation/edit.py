"""`invedit edit`: invert a real image, then denoise it under a source and a target prompt with an
attention controller (DESIGN.md §1, §3; ALGORITHMS.md part A §2-§6 for the inversions, part B for
the controllers, with PIE-Bench's defaults).

Methods, as the reference runs them:
- p2p / p2p-replace / none: rows [u_src, u_tgt, c_src, c_tgt], uncond "" (or the inversion's
  per-step null embeddings: null-text, negative-prompt), Prompt-to-Prompt refine (or replace);
  a blend word pair adds LocalBlend and reweights the target word x2 (part B §3.2).
- masactrl: the same rows, but the source branch and the inversion use the empty prompt (part A
  §6.4; --masactrl-source-prompt uses the source prompt instead).
- pnp: rows [reference, u_tgt, c_tgt]; the reference row is fed, at each step, the inversion latent
  of that timestep (direct) or of a DDIM reconstruction (ddim), conditioned on ""; the target's
  uncond row uses the negative prompt (part A §6.5, part B §5).
Writes OUT/edited.png, OUT/grid.png (source | reconstruction | edit, prompts under them),
OUT/attention.png (the target's cross-attention map per word), with --save-latents
OUT/latents/{trajectory,final}.npy, and last OUT/run.json; every file atomically, nothing at all
when the input is refused.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from control.masactrl import MutualSelfAttention
from control.p2p import P2PSettings, make_p2p
from control.pnp import NEGATIVE_PROMPT, PlugAndPlay
from control.record import CrossMapRecorder, TrajectoryRecorder
from control.words import strip_brackets, token_ids, word_positions
from evaluation.options import add_run_options, check_run_options
from evaluation.outputs import StageTimer, grid, run_record, save_npy, save_png, write_run_json
from inversion.ddim import InversionConfig, invert_ddim
from inversion.direct import DirectConfig, invert_direct
from inversion.negative_prompt import NegativePromptConfig, invert_negative_prompt
from inversion.null_text import NullTextConfig, invert_null_text
from ldm.context import BatchLayout, Controller, NoControl, Row
from ldm.errors import ArgumentParser, UsageError
from ldm.image import decode, encode, load_image
from ldm.tokenizer import Tokenizer
from samplers.guidance import ClassifierFree, Guidance
from samplers.loop import denoise
from samplers.prox import Proximal
from samplers.trajectory import Inversion

INVERSIONS = ("ddim", "direct", "negative-prompt", "null-text")
CONTROLS = ("p2p", "p2p-replace", "masactrl", "pnp", "none")


@dataclass(frozen=True)
class EditSpec:
    """Every setting of one edit (defaults: PIE-Bench's)."""

    source: str
    target: str
    inversion: str = "direct"
    control: str = "p2p"
    steps: int = 50
    guidance: float = 7.5
    cross: float = 0.4
    cross_words: dict[str, tuple[float, float]] | None = None  # per-target-word cross windows
    self_: float = 0.6
    blend: tuple[str, str] | None = None
    reweight: dict[str, float] | None = None
    masactrl_step: int = 4
    masactrl_layer: int = 10
    masactrl_source_prompt: bool = False
    pnp_features: float = 0.8
    pnp_attention: float = 0.5
    negative_prompt: str = NEGATIVE_PROMPT
    prox: str | None = None
    quantile: float = 0.75
    direct_form: str = "fused"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.inversion not in INVERSIONS:
            raise UsageError(f"unknown inversion {self.inversion!r}; choose from {', '.join(INVERSIONS)}")
        if self.control not in CONTROLS:
            raise UsageError(f"unknown control {self.control!r}; choose from {', '.join(CONTROLS)}")
        if self.control == "pnp" and self.inversion not in ("ddim", "direct"):
            raise UsageError(f"--control pnp takes --inversion ddim or direct, not {self.inversion!r}")
        if not self.control.startswith("p2p") and (self.blend or self.reweight):
            raise UsageError(f"--blend / --reweight are Prompt-to-Prompt options, not for --control {self.control}")
        if self.prox not in (None, "l0", "l1"):
            raise UsageError(f"unknown --prox {self.prox!r}; choose from l0, l1")
        if not 1 <= self.steps <= 1000:
            raise UsageError(f"--steps {self.steps}: expected 1..1000")
        if self.direct_form not in ("fused", "offset"):
            raise UsageError(f"unknown --direct-form {self.direct_form!r}; choose from fused, offset")

    @property
    def inversion_prompt(self) -> str:
        """The prompt the image is inverted with and the source branch denoised under."""
        if self.control == "masactrl" and not self.masactrl_source_prompt:
            return ""
        return self.source


@dataclass
class EditResult:
    latents: Tensor  # (2, 4, h, w): row 0 source branch, row 1 target
    inversion: Inversion
    controller: Controller
    recorder: CrossMapRecorder
    unet_rows: dict[str, int] = field(default_factory=dict)


def prepare(spec: EditSpec) -> EditSpec:
    """PIE-style prompts: brackets removed, whitespace normalised."""
    from dataclasses import replace

    return replace(spec, source=strip_brackets(spec.source), target=strip_brackets(spec.target),
                   negative_prompt=strip_brackets(spec.negative_prompt))


def check_prompts(tokenizer: Tokenizer, spec: EditSpec) -> Controller | None:
    """Refuse over-long prompts, absent words and unequal replace prompts before any compute;
    returns the Prompt-to-Prompt controller when the spec asks for one (it needs only the tokenizer)."""
    for prompt in (spec.source, spec.target, spec.negative_prompt):
        token_ids(tokenizer, prompt)
    if not spec.control.startswith("p2p"):
        return None
    cross = {"default_": spec.cross, **(spec.cross_words or {})} if spec.cross_words else spec.cross
    settings = P2PSettings(replace=spec.control == "p2p-replace", cross=cross, self_=spec.self_,
                           blend=spec.blend, reweight=spec.reweight)
    return make_p2p(tokenizer, spec.source, spec.target, spec.steps, settings)


def build_controller(sd: Any, spec: EditSpec) -> Controller:
    """The controller of the spec (PnP reads the model's sites)."""
    p2p = check_prompts(sd.tokenizer, spec)
    if p2p is not None:
        return p2p
    if spec.control == "masactrl":
        return MutualSelfAttention(spec.masactrl_step, spec.masactrl_layer)
    if spec.control == "pnp":
        return PlugAndPlay(sd.unet.attn_sites(), sd.unet.res_sites(), spec.steps, spec.pnp_features, spec.pnp_attention)
    return NoControl()


def early_tokenizer(model: str) -> Tokenizer | None:
    """The model's tokenizer without loading its weights (None if the directory has none: the model
    loader then says what is wrong with the directory)."""
    if model == "tiny-random":
        return Tokenizer.bundled()
    directory = Path(model) / "tokenizer"
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return Tokenizer.from_dir(directory)
    return None


def invert(sd: Any, z0: Tensor, c_inv: Tensor, spec: EditSpec) -> Inversion:
    common = dict(steps=spec.steps, guidance=spec.guidance, progress=spec.progress)
    if spec.inversion == "ddim" or spec.control == "pnp":  # PnP feeds latents; it needs no corrections
        return invert_ddim(sd, z0, c_inv, InversionConfig(**common))
    if spec.inversion == "direct":
        return invert_direct(sd, z0, c_inv, DirectConfig(**common, form=spec.direct_form))
    if spec.inversion == "negative-prompt":
        return invert_negative_prompt(sd, z0, c_inv, NegativePromptConfig(**common))
    return invert_null_text(sd, z0, c_inv, NullTextConfig(**common))


def guidance_of(spec: EditSpec) -> Guidance:
    if spec.prox is None:
        return ClassifierFree(spec.guidance)
    return Proximal(spec.guidance, spec.quantile, spec.prox)  # type: ignore[arg-type]


def run_edit(sd: Any, z0: Tensor, spec: EditSpec, controller: Controller, inversion: Inversion | None = None,
             timer: StageTimer | None = None) -> EditResult:
    """Invert (unless an inversion of z0 under spec.inversion_prompt is given) and edit."""
    timer = timer or StageTimer()
    e_null, e_inv, e_tgt, e_neg = sd.embed(["", spec.inversion_prompt, spec.target, spec.negative_prompt]).split(1)
    rows: dict[str, int] = {}
    with timer("invert"):
        if inversion is None:
            inversion = invert(sd, z0, e_inv, spec)
        rows["inversion"] = inversion.unet_rows
    recorder = CrossMapRecorder(controller)
    if spec.control == "pnp":
        feed = inversion
        if spec.inversion == "ddim":  # PnP's source row from a DDIM reconstruction of the inverted noise
            with timer("reconstruct"):
                rec = TrajectoryRecorder()
                out = denoise(sd, None, torch.cat([e_null, e_inv]), BatchLayout.cfg(("source",)), rec,
                              spec.guidance, inversion, progress=spec.progress, desc="reconstruct")
                rows["reconstruction"] = out.unet_rows
                feed = Inversion(z_T=inversion.z_T, trajectory=[*reversed(rec.latents), inversion.z_T])
        layout = BatchLayout((Row("reference", "cond"), Row("target", "uncond"), Row("target", "cond")))
        emb = torch.cat([e_null, e_neg, e_tgt])
        with timer("edit"):
            out = denoise(sd, None, emb, layout, recorder, guidance_of(spec), feed, progress=spec.progress, desc="edit")
        latents = torch.cat([feed.trajectory[0].to(out.latents), out.role("target")])
    else:
        layout = BatchLayout.cfg()
        emb = {Row("source", "uncond"): e_null, Row("target", "uncond"): e_null,
               Row("source", "cond"): e_inv, Row("target", "cond"): e_tgt}
        with timer("edit"):
            out = denoise(sd, None, emb, layout, recorder, guidance_of(spec), inversion, progress=spec.progress,
                          desc="edit")
        latents = torch.cat([out.role("source"), out.role("target")])
    rows["edit"] = out.unet_rows
    return EditResult(latents, inversion, controller, recorder, rows)


def attention_picture(sd: Any, recorder: CrossMapRecorder, prompt: str, latent_hw: tuple[int, int],
                      tile: int = 128) -> np.ndarray | None:
    """One tile per word of the prompt: the mean cross-attention map of its tokens, the word below."""
    maps = recorder.mean_maps(latent_hw)
    if maps is None:
        return None
    tiles, captions = [], []
    for k, word in enumerate(prompt.split(" ")):
        positions = word_positions(sd.tokenizer, prompt, k)
        if not positions:
            continue
        m = maps[positions].mean(0)[None, None]  # (1, 1, h, w)
        m = F.interpolate(m, size=(tile, tile * latent_hw[1] // latent_hw[0]), mode="nearest")[0, 0]
        m = (m - m.min()) / (m.max() - m.min() + 1e-12)
        tiles.append(np.repeat((m.cpu().numpy() * 255).astype(np.uint8)[..., None], 3, axis=2))
        captions.append(word)
    return grid(tiles, captions) if tiles else None


def split_word_value(item: str, option: str, parse, expected: str):
    """WORD=VALUE -> (word, parse(value)); anything else is a UsageError naming the option."""
    word, sep, value = item.rpartition("=")
    try:
        parsed = parse(value) if sep and word else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise UsageError(f"{option} {item!r}: expected {expected}")
    return word, parsed


def parse_reweight(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    return dict(split_word_value(item, "--reweight", float, "WORD=VALUE, e.g. cake=2") for item in items)


def _window(value: str) -> tuple[float, float] | None:
    bounds = [float(v) for v in value.split(":")]
    if len(bounds) not in (1, 2):
        return None
    return (0.0, bounds[0]) if len(bounds) == 1 else (bounds[0], bounds[1])


def parse_cross_words(items: list[str] | None) -> dict[str, tuple[float, float]] | None:
    """WORD=END or WORD=START:END (fractions of the run) -> {word: (start, end)}."""
    if not items:
        return None
    expected = "WORD=END or WORD=START:END, e.g. cake=0.2:0.6"
    return dict(split_word_value(item, "--cross-word", _window, expected) for item in items)


def parse_blend(text: str | None) -> tuple[str, str] | None:
    if text is None or not text.strip():  # PIE-Bench's empty blended_word: no blend
        return None
    words = text.split()
    if len(words) != 2:
        raise UsageError(f"--blend {text!r}: expected two words, the source word and the target word")
    return words[0], words[1]


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="invedit edit", description="Edit a real image with a source and a target prompt.")
    p.add_argument("--model", required=True, help="converted model directory, or tiny-random")
    p.add_argument("--image", required=True)
    p.add_argument("--source", required=True, help="prompt describing the image ([ ] are removed, as PIE-Bench's)")
    p.add_argument("--target", required=True, help="prompt describing the edit")
    p.add_argument("--inversion", default="direct", help=f"one of {', '.join(INVERSIONS)} (default direct)")
    p.add_argument("--control", default="p2p", help=f"one of {', '.join(CONTROLS)} (default p2p)")
    p.add_argument("--blend", help='LocalBlend words "SOURCE_WORD TARGET_WORD"; reweights the target word x2')
    p.add_argument("--reweight", action="append", metavar="WORD=VALUE", help="scale a target word's attention")
    p.add_argument("--cross", type=float, default=0.4, help="P2P cross-attention replacement fraction")
    p.add_argument("--cross-word", action="append", metavar="WORD=START:END",
                   help="P2P cross-attention window of one target word (fractions), overriding --cross")
    p.add_argument("--self", dest="self_", type=float, default=0.6, help="P2P self-attention replacement fraction")
    p.add_argument("--masactrl-step", type=int, default=4)
    p.add_argument("--masactrl-layer", type=int, default=10)
    p.add_argument("--masactrl-source-prompt", action="store_true",
                   help="invert and denoise the source branch with --source instead of the empty prompt")
    p.add_argument("--pnp-features", type=float, default=0.8, help="PnP feature-injection fraction of steps")
    p.add_argument("--pnp-attention", type=float, default=0.5, help="PnP Q/K-injection fraction of steps")
    p.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="PnP target's unconditional prompt")
    p.add_argument("--prox", default=None, help="proximal guidance (ProxEdit): l0 or l1")
    p.add_argument("--quantile", type=float, default=0.75, help="proximal guidance threshold quantile")
    p.add_argument("--direct-form", default="fused", help="DirectInversion: fused (in the loop) or offset (reference)")
    add_run_options(p)
    return p


def main(argv: list[str]) -> int:
    from ldm.model import open_model

    args = parser().parse_args(argv)
    run = check_run_options(args)
    out, size = run.output, run.size
    spec = prepare(EditSpec(
        source=args.source, target=args.target, inversion=args.inversion, control=args.control, steps=args.steps,
        guidance=args.guidance, cross=args.cross, cross_words=parse_cross_words(args.cross_word), self_=args.self_,
        blend=parse_blend(args.blend),
        reweight=parse_reweight(args.reweight), masactrl_step=args.masactrl_step, masactrl_layer=args.masactrl_layer,
        masactrl_source_prompt=args.masactrl_source_prompt, pnp_features=args.pnp_features,
        pnp_attention=args.pnp_attention, negative_prompt=args.negative_prompt, prox=args.prox,
        quantile=args.quantile, direct_form=args.direct_form, progress=not args.no_progress,
    ))
    tokenizer = early_tokenizer(args.model)
    if tokenizer is not None:
        check_prompts(tokenizer, spec)
    timer = StageTimer()
    with timer("load_image"):
        image = load_image(args.image, size)
    with timer("load_model"):
        sd = open_model(args.model, run.dtype, args.device)
    controller = build_controller(sd, spec)  # bad words / prompts are refused here, before any compute
    with timer("encode"):
        z0 = encode(sd, image)
    result = run_edit(sd, z0, spec, controller, timer=timer)
    with timer("decode"):
        recon, edited = decode(sd, result.latents)
    latent_hw = tuple(z0.shape[-2:])
    attention = attention_picture(sd, result.recorder, spec.target, latent_hw)  # type: ignore[arg-type]
    touched = sorted(result.controller.touched) if hasattr(result.controller, "touched") else []
    final = result.latents.cpu()
    metrics = {
        "unet_rows": {**result.unet_rows, "total": sum(result.unet_rows.values())},
        "sites_touched": len(touched),
        "sites": [f"{kind}:{index}:{name}" for kind, index, name in touched],
        "target_vs_source_latent_rms": float((final[1] - final[0]).pow(2).mean().sqrt()),
        "source_vs_input_latent_rms": float((final[0] - z0.cpu()[0]).pow(2).mean().sqrt()),
    }
    with timer("write"):
        save_png(out / "edited.png", edited)
        inv_prompt = spec.inversion_prompt or '""'
        save_png(out / "grid.png", grid([image, recon, edited], [
            f"source: {spec.source}", f"reconstruction ({spec.inversion}, {inv_prompt})",
            f"edit ({spec.control}): {spec.target}"]))
        if attention is not None:
            save_png(out / "attention.png", attention)
        if args.save_latents:
            save_npy(out / "latents" / "trajectory.npy", result.inversion.trajectory)  # (steps+1, 1, 4, h, w)
            save_npy(out / "latents" / "final.npy", final)  # (2, 4, h, w): source, target
    params = {**vars(args), "size": list(size), "spec": asdict(spec)}
    record = run_record("edit", params, timer.as_dict(), metrics,
                        model={"spec": args.model, "dtype": str(sd.dtype), "device": str(sd.device)})
    write_run_json(out / "run.json", record)  # last: its presence marks a complete run
    print(f"edit ({spec.inversion}+{spec.control}): {metrics['sites_touched']} attention/feature sites edited, "
          f"{metrics['unet_rows']['total']} UNet row evaluations; wrote {out}")
    return 0
