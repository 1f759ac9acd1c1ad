"""The editing API: invert, reconstruct and edit a photo in memory, without writing any file.

    sd = StableDiffusion.load("models/sd14")
    image = load_image("cake.jpg", 512)
    spec = Registry().edit_spec("directinversion+p2p", source="a round cake", target="a square cake",
                                blend=("cake", "cake"))
    result = edit(sd, image, spec)          # result.edited: (512, 512, 3) uint8

`edit` runs every editing method the same way (docs/architecture.md "One edit, step by step"):
clean the prompts, ask the method for its plan (rows, texts, controllers, guidance; words and
layers are checked here, before any compute), encode the image, embed every text in one call,
invert (unless an inversion is passed in: invert once, edit many times), let the plan prepare the
inversion, run the one loop (samplers/loop.py) with a cross-attention recorder composed in front of
the method's controllers, decode. `reconstruct` is the same with the source prompt alone and no
controller; `invert` stops after the inversion. The command line (evaluation/commands/) and the
benchmark runner call these functions and write files around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from control.method import EditMethod, EditPlan, EditPrompts, Sampling
from control.record import CrossMapRecorder
from control.words import strip_brackets, token_ids
from evaluation.images import check_image, decode, encode, to_tensor
from evaluation.timing import StageTimer
from inversion.method import InversionMethod, InversionTask
from ldm.context import BatchLayout, Controller, Row
from ldm.errors import PromptError, UsageError
from ldm.model import StableDiffusion
from samplers.guidance import ClassifierFree
from samplers.inversion import Inversion
from samplers.loop import denoise
from samplers.schedule import Schedule
from samplers.settings import Settings

MAX_STEPS = 1000


def _check_run(steps: int, guidance: float, seed: int) -> None:
    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps {steps}: expected 1..{MAX_STEPS}")
    if not np.isfinite(guidance):
        raise UsageError(f"--guidance {guidance}: expected a finite number")
    if not 0 <= seed < 2**64:  # what a torch generator takes
        raise UsageError(f"--seed {seed}: expected 0..2^64-1")


def _check_settings_type(method: InversionMethod | EditMethod, settings: Settings) -> None:
    if not isinstance(settings, method.settings):
        raise TypeError(f"{method.name} takes {method.settings.__name__}, not {type(settings).__name__}")


@dataclass(frozen=True)
class InversionSpec:
    """How to invert one image: the prompt, the method and its settings, the grid, the guidance the
    edit will use (null-text and DirectInversion's offset form optimise / record against it)."""

    prompt: str
    method: InversionMethod
    settings: Settings
    steps: int = 50
    guidance: float = 7.5
    seed: int = 1234

    def __post_init__(self) -> None:
        _check_run(self.steps, self.guidance, self.seed)
        _check_settings_type(self.method, self.settings)


@dataclass(frozen=True)
class EditSpec:
    """Every setting of one edit. Registry.edit_spec builds one from names; defaults are PIE-Bench's."""

    source: str
    target: str
    inversion: InversionMethod
    inversion_settings: Settings
    method: EditMethod
    method_settings: Settings
    steps: int = 50
    guidance: float = 7.5
    seed: int = 1234
    allow_idle: bool = False  # run settings under which the method touches nothing (control.method.refuse_idle)

    def __post_init__(self) -> None:
        _check_run(self.steps, self.guidance, self.seed)
        _check_settings_type(self.inversion, self.inversion_settings)
        _check_settings_type(self.method, self.method_settings)
        if not self.prompts.target:  # an edit needs a prompt to edit towards
            raise PromptError(f"--target {self.target!r} is blank: give the prompt describing the edit")
        if self.method.inversions is not None and self.inversion.name not in self.method.inversions:
            raise UsageError(f"--control {self.method.name} works with --inversion "
                             f"{' or '.join(self.method.inversions)}, not {self.inversion.name}")
        if self.inversion.edits is not None and self.method.name not in self.inversion.edits:
            raise UsageError(f"--inversion {self.inversion.name} works with --control "
                             f"{' or '.join(self.inversion.edits)}, not {self.method.name}")

    @property
    def prompts(self) -> EditPrompts:
        """PIE-style prompts: brackets removed, whitespace normalised."""
        return EditPrompts(strip_brackets(self.source), strip_brackets(self.target))

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.steps, self.guidance, self.allow_idle)

    @property
    def name(self) -> str:
        return f"{self.inversion.name}+{self.method.name}"

    def with_target(self, target: str) -> "EditSpec":
        return replace(self, target=target)

    def as_dict(self) -> dict[str, Any]:
        """Every setting, for run.json."""
        return {
            "source": self.prompts.source, "target": self.prompts.target,
            "inversion": self.inversion.name, "inversion_settings": self.inversion_settings.as_dict(),
            "method": self.method.name, "method_settings": self.method_settings.as_dict(),
            "steps": self.steps, "guidance": self.guidance, "seed": self.seed,
            **({"allow_idle": True} if self.allow_idle else {}),  # said loudly, where it was asked for
        }

    def inversion_spec(self, plan: EditPlan) -> InversionSpec:
        return InversionSpec(plan.inversion_prompt, self.inversion, self.inversion_settings, self.steps, self.guidance,
                             self.seed)


def resolve_spec(spec: EditSpec, image: np.ndarray) -> EditSpec:
    """The spec with the method's settings that depend on the photo filled in (pix2pix-zero's BLIP
    caption, EditMethod.resolve); `edit` does this first, and a caller that plans an edit itself
    (to share work between edits) must do it before planning. Resolving twice changes nothing."""
    if spec.method.resolve is None:
        return spec
    return replace(spec, method_settings=spec.method.resolve(spec.method_settings, image))


def plan_edit(facts_or_sd: Any, spec: EditSpec) -> EditPlan:
    """The method's plan for this edit: every prompt, word and layer choice is checked here, with
    the tokenizer and the UNet's sites only (ModelFacts or a loaded StableDiffusion)."""
    facts = facts_or_sd.facts() if isinstance(facts_or_sd, StableDiffusion) else facts_or_sd
    plan = spec.method.plan(facts, spec.prompts, spec.method_settings, spec.sampling)
    for text in {plan.inversion_prompt, *plan.prompts.values()}:
        token_ids(facts.tokenizer, text)  # refuses prompts over 75 tokens
    return plan


def embed_texts(sd: StableDiffusion, texts: list[str]) -> dict[str, Tensor]:
    """Each distinct text embedded once, all in one text-encoder call: every use of a text then
    reads the very same tensor (DirectInversion's offsets need bit-identical uncond inputs)."""
    unique = list(dict.fromkeys(["", *texts]))
    return dict(zip(unique, sd.embed(unique).split(1)))


def inversion_task(spec: InversionSpec, z0: Tensor, embeddings: Mapping[str, Tensor], *, image: np.ndarray | None,
                   target: Tensor | None = None, trajectory: tuple[Tensor, ...] | None = None,
                   progress: bool = False) -> InversionTask:
    return InversionTask(
        z0=z0, prompt=embeddings[spec.prompt], null=embeddings[""], schedule=Schedule(steps=spec.steps),
        guidance=spec.guidance, target=target, trajectory=trajectory,
        image=None if image is None else to_tensor(image).to(z0.device), seed=spec.seed, progress=progress,
    )


def run_inversion(sd: StableDiffusion, spec: InversionSpec, task: InversionTask) -> Inversion:
    with torch.random.fork_rng(devices=[]):  # a stochastic method's draws never disturb the caller's RNG
        return spec.method.invert(sd, task, spec.settings)


@dataclass(frozen=True)
class EditResult:
    """One edit, in memory.

    latents: (2, 4, h, w) final latents, row 0 the source branch, row 1 the target.
    reconstruction / edited: (H, W, 3) uint8 decodes of the two rows.
    attention: (77, h', w') the target's mean cross-attention map per token at the 16x16-at-512
        level, over the whole run (None if the method's rows have no conditional target).
    sites: the attention/feature sites the method edited or steers by ("self:10:output_blocks...").
    unet_rows: UNet batch-row evaluations per stage; timings: seconds per stage.
    """

    spec: EditSpec
    inversion_prompt: str
    z0: Tensor
    latents: Tensor
    reconstruction: np.ndarray
    edited: np.ndarray
    inversion: Inversion
    attention: Tensor | None
    sites: tuple[str, ...]
    unet_rows: Mapping[str, int]
    timings: Mapping[str, float]

    @property
    def prompts(self) -> EditPrompts:
        return self.spec.prompts


def edit(
    sd: StableDiffusion,
    image: np.ndarray,
    spec: EditSpec,
    *,
    inversion: Inversion | None = None,
    trajectory: tuple[Tensor, ...] | None = None,
    progress: bool = False,
    timer: StageTimer | None = None,
) -> EditResult:
    """Invert `image` ((H, W, 3) uint8, sides multiples of 64) and edit it as `spec` says.

    inversion: an inversion of this image under the plan's inversion prompt, made earlier (by
        `invert`, or read from an inversion file): the edit starts from it without inverting again.
    trajectory: a DDIM trajectory of the image under the inversion prompt already computed (the
        benchmark runner shares one between the methods that start from it).
    """
    timer = timer or StageTimer()
    if spec.method.resolve is not None:
        with timer("resolve"):
            spec = resolve_spec(spec, image)
    plan = plan_edit(sd, spec)
    inv_spec = spec.inversion_spec(plan)
    z0, embeddings = edit_inputs(sd, image, spec, plan, timer)
    rows: dict[str, int] = {}
    if inversion is None:
        task = inversion_task(inv_spec, z0, embeddings, image=image, target=embeddings[spec.prompts.target],
                              trajectory=trajectory, progress=progress)
        with timer("invert"):
            inversion = run_inversion(sd, inv_spec, task)
        rows["inversion"] = inversion.cost.unet_rows
    elif inversion.grid_steps != spec.steps or inversion.latent_shape != tuple(z0.shape):
        raise UsageError(f"the inversion has {inversion.grid_steps} steps of latents {inversion.latent_shape}; this edit "
                         f"needs {spec.steps} steps of {tuple(z0.shape)}")
    feed = inversion
    if plan.prepare is not None:
        with timer("prepare"):
            feed = plan.prepare(sd, inversion, embeddings, progress)
    recorder = CrossMapRecorder("target")
    controllers = (recorder, *plan.controllers)
    texts = {row: embeddings[text] for row, text in plan.prompts.items()}
    sample = spec.inversion.sampler or denoise  # EDICT denoises its coupled pair with its own sampler
    with timer("edit"):
        out = sample(sd, lean_layout(plan, feed, controllers), texts, inversion=feed, controllers=controllers,
                      guidance=plan.guidance, hooks=plan.hooks, progress=progress, desc="edit")
    rows["edit"] = out.unet_rows + sum(getattr(hook, "unet_rows", 0) for hook in plan.hooks)
    if plan.prepare is not None and feed is not inversion:
        rows["prepare"] = feed.cost.unet_rows - inversion.cost.unet_rows  # what the prepared inversion added
    # the source branch: its stepped row, or, when the source is a reference row fed from the
    # (prepared) inversion, the latent it was fed last
    source = out.role("source") if "source" in out.roles else feed.z0.to(out.latents)
    latents = torch.cat([source, out.role("target")])
    with timer("decode"):
        reconstruction, edited = decode(sd, latents)
    sites = sorted({site for c in (*plan.controllers, *plan.hooks) for site in getattr(c, "touched", ())})
    return EditResult(
        spec=spec, inversion_prompt=plan.inversion_prompt, z0=z0, latents=latents, reconstruction=reconstruction, edited=edited, inversion=inversion,
        attention=recorder.mean_maps(), sites=tuple(f"{kind}:{index}:{name}" for kind, index, name in sites),
        unet_rows={**rows, "total": sum(rows.values())}, timings=timer.as_dict(),
    )


def lean_layout(plan: EditPlan, inversion: Inversion, controllers: tuple[Controller, ...]) -> BatchLayout:
    """The plan's rows less those whose prediction nothing uses.

    When the inversion replaces every step of a role (fused DirectInversion puts the source on the
    trajectory whatever its step computed), that role's noise prediction is discarded, and its
    unconditional row served nothing but that prediction's guidance. Dropped when nothing else can
    see it: no controller reads unconditional rows (P2P and LocalBlend edit and store the
    conditional half only, as the references do), no step hook runs, and the guidance combines each
    role on its own (plain CFG; proximal guidance thresholds across the whole batch). The role's
    conditional row stays: the controllers read its attention. A DirectInversion + P2P edit is
    then 3 UNet rows a step instead of 4, with the same outputs (docs/performance.md)."""
    role = inversion.unpredicted_role
    if (role is None or not plan.layout.has(role, "uncond") or plan.hooks
            or not isinstance(plan.guidance, ClassifierFree)
            or any(getattr(c, "reads_uncond_rows", True) for c in controllers)):
        return plan.layout
    return plan.layout.without(Row(role, "uncond"))


def _encode(sd: StableDiffusion, image: np.ndarray, texts: list[str], timer: StageTimer) -> tuple[Tensor, dict[str, Tensor]]:
    check_image(image)
    with timer("encode"):
        return encode(sd, image), embed_texts(sd, texts)


def edit_texts(spec: EditSpec, plan: EditPlan) -> tuple[str, ...]:
    """Every text an edit embeds, in the order of its one text-encoder call: two edits with the same
    texts get bit-identical embeddings (a different batch may round differently on some devices)."""
    return tuple(dict.fromkeys(["", plan.inversion_prompt, spec.prompts.target, *plan.prompts.values()]))


def edit_inputs(sd: StableDiffusion, image: np.ndarray, spec: EditSpec, plan: EditPlan,
                timer: StageTimer | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """z0 and the embeddings of every text an edit uses, as `edit` computes them (an inversion made
    for this edit elsewhere must see the very same tensors)."""
    return _encode(sd, image, list(edit_texts(spec, plan)), timer or StageTimer())


def invert(sd: StableDiffusion, image: np.ndarray, spec: InversionSpec, *, target: str | None = None,
           progress: bool = False, timer: StageTimer | None = None) -> Inversion:
    """Invert `image` under spec.prompt (brackets removed). target: the edit's target prompt, for
    methods that record in the edit's own batch (DirectInversion's offset form)."""
    timer = timer or StageTimer()
    spec = replace(spec, prompt=strip_brackets(spec.prompt))
    target = strip_brackets(target) if target else None
    z0, embeddings = _encode(sd, image, [spec.prompt, *([target] if target else [])], timer)
    task = inversion_task(spec, z0, embeddings, image=image, progress=progress,
                          target=embeddings[target] if target else None)
    with timer("invert"):
        return run_inversion(sd, spec, task)


@dataclass(frozen=True)
class ReconstructResult:
    """latent: (1, 4, h, w) final latent of the source prompt alone; image: its decode."""

    spec: InversionSpec
    z0: Tensor
    latent: Tensor
    image: np.ndarray
    inversion: Inversion
    unet_rows: Mapping[str, int]
    timings: Mapping[str, float] = field(default_factory=dict)


def reconstruct(sd: StableDiffusion, image: np.ndarray, spec: InversionSpec, *, inversion: Inversion | None = None,
                progress: bool = False, timer: StageTimer | None = None) -> ReconstructResult:
    """Invert `image` and denoise it back with its own prompt: rows [E(""), E(prompt)], the edit's
    guidance, no controller. The first test of every inversion method."""
    timer = timer or StageTimer()
    spec = replace(spec, prompt=strip_brackets(spec.prompt))
    z0, embeddings = _encode(sd, image, [spec.prompt], timer)
    if inversion is None:
        task = inversion_task(spec, z0, embeddings, image=image, progress=progress)
        with timer("invert"):
            inversion = run_inversion(sd, spec, task)
    prompt = spec.prompt
    layout = BatchLayout.cfg(("source",))
    texts = {Row("source", "uncond"): embeddings[""], Row("source", "cond"): embeddings[prompt]}
    sample = spec.method.sampler or denoise
    with timer("denoise"):
        out = sample(sd, layout, texts, inversion=inversion, guidance=spec.guidance, progress=progress,
                      desc="reconstruct")
    with timer("decode"):
        recon = decode(sd, out.latents)[0]
    rows = {"inversion": inversion.cost.unet_rows, "denoise": out.unet_rows}
    return ReconstructResult(spec, z0, out.latents, recon, inversion, {**rows, "total": sum(rows.values())},
                             timer.as_dict())
