"""Plug-and-Play (Tumanyan et al. 2023, §4: feature and self-attention injection) as PIE-Bench runs it.

docs/methods/plug-and-play.md. Rows: a `reference` row fed by the loop with the inversion
latent of the current step (conditioned on the empty prompt, never stepped), then the target's
uncond (negative prompt) and cond rows. For the first int(num_steps * attn_frac) steps, in the
self-attention of every decoder block except the first (SD-1.4's L = 8..15), both target rows
attend with the reference row's queries and keys and their own values:
O_tgt = attention(Q_ref, K_ref, V_tgt). For the first int(num_steps * feature_frac) steps the
residual branch of the second ResBlock of the decoder level just above the lowest one (diffusers'
up_blocks[1].resnets[1]) is replaced by the reference row's, before each row adds its own skip.

What the reference row is fed (`--pnp-source`): with DirectInversion, the inversion trajectory at
the same timestep (PIE's directinversion+pnp); with DDIM inversion, a guidance-1 DDIM
reconstruction of z_T under the source prompt, at the same timestep. PIE's ddim+pnp feeds that
reconstruction one step late and starts the target one step in (an off-by-one): offered as
`reconstruction-shifted` to reproduce its numbers, never the default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from torch import Tensor

from control.base import ControllerBase, StepWindow, replace_rows
from control.method import EditMethod, EditPlan, EditPrompts, Pair, Sampling, refuse_idle
from control.record import TrajectoryRecorder
from kernels.attention import fused_attention_rows
from ldm.context import AttnContext, AttnSite, BatchLayout, ResSite, Row, RunInfo
from ldm.model import ModelFacts, StableDiffusion
from samplers.guidance import ClassifierFree
from samplers.inversion import Inversion, InversionCost
from samplers.loop import denoise
from samplers.settings import Alias, Settings, setting

NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"


class PlugAndPlay(ControllerBase):
    def __init__(self, attn_sites: list[AttnSite], res_sites: list[ResSite], num_steps: int,
                 feature_frac: float = 0.8, attn_frac: float = 0.5) -> None:
        super().__init__()
        up = sorted(s.index for s in attn_sites if s.place == "up" and s.kind == "self")
        self.qk_blocks = frozenset(up[1:])  # every decoder block but the first
        up_res = [s for s in res_sites if s.place == "up"]
        level = max(s.level for s in up_res) - 1
        picked = [s.index for s in up_res if s.level == level and s.block == 1]
        if len(picked) != 1:
            raise ValueError(f"no unique up ResBlock at level {level}, block 1 in {up_res}")
        self.feature_block = picked[0]
        self.qk_window = StepWindow.of(attn_frac, num_steps)
        self.feature_window = StepWindow.of(feature_frac, num_steps)

    def start(self, run: RunInfo) -> None:
        super().start(run)
        layout = run.layout
        (ref,) = layout.indices("reference")
        targets = layout.indices("target")
        rows = list(range(len(layout)))
        qk = [ref if i in targets else i for i in rows]
        self.qk_rows = (run.row_index(qk), run.row_index(qk), run.row_index(rows))  # Q, K of the reference, own V
        self.ref, self.targets = ref, targets

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor | None:
        if site.kind != "self" or site.index not in self.qk_blocks or ctx.step not in self.qk_window:
            return None
        self._touch(site)
        return fused_attention_rows(q, k, v, *self.qk_rows)

    def features(self, h: Tensor, site: ResSite, ctx: AttnContext) -> Tensor:
        if site.index != self.feature_block or ctx.step not in self.feature_window:
            return h
        self._touch(site)
        return replace_rows(h, {i: h[self.ref] for i in self.targets})


FEEDS = ("auto", "trajectory", "reconstruction", "reconstruction-shifted")


@dataclass(frozen=True)
class PnPSettings(Settings):
    features: float = setting(0.8, "fraction of the run with residual-feature injection", flag="--pnp-features",
                              low=0.0, high=1.0)
    attention: float = setting(0.5, "fraction of the run with self-attention Q/K injection", flag="--pnp-attention",
                               low=0.0, high=1.0)
    negative_prompt: str = setting(NEGATIVE_PROMPT, "the target's unconditional prompt (the reference's negative prompt)")
    reference_feed: str = setting("auto", "what the reference row is fed: the inversion trajectory, a guidance-1 DDIM "
                          "reconstruction, or that reconstruction one step late as PIE's ddim+pnp does; auto = "
                          "trajectory when the inversion pins the source (DirectInversion), else reconstruction",
                          flag="--pnp-source", choices=FEEDS)


def reconstruction_feed(sd: StableDiffusion, inversion: Inversion, prompt: Tensor, shifted: bool, progress: bool) -> Inversion:
    """An Inversion whose pivots are a guidance-1 DDIM reconstruction r_0 = z_T, r_1, ..., r_T of the
    inverted noise: pivot(i) = r_i (or r_{i+1}, starting from r_1, when `shifted`); z0 = r_T."""
    recorder = TrajectoryRecorder()
    layout = BatchLayout((Row("source", "cond"),))
    denoise(sd, layout, prompt, inversion=inversion, controllers=(recorder,), guidance=1.0, progress=progress,
            desc="PnP source reconstruction")
    rec = [inversion.z_T, *recorder.latents]  # r_0 .. r_T
    if shifted:  # trajectory[-1 - i] = r_{i+1}; trajectory[0] is never read as a pivot
        trajectory = (rec[-1], *reversed(rec[1:]))
    else:  # trajectory[-1 - i] = r_i
        trajectory = tuple(reversed(rec))
    cost = inversion.cost + InversionCost(unet_rows=inversion.steps)  # the 1-row reconstruction pass
    return Inversion(inversion.method, trajectory, settings=inversion.settings, cost=cost)


def plan_pnp(facts: ModelFacts, prompts: EditPrompts, settings: PnPSettings, sampling: Sampling) -> EditPlan:
    """Rows [reference/cond, target/uncond, target/cond] with texts ["", negative prompt, target]."""
    controller = PlugAndPlay(list(facts.attn_sites), list(facts.res_sites), sampling.steps, settings.features,
                             settings.attention)
    if not (controller.qk_window.end > 0 or controller.feature_window.end > 0):
        refuse_idle(sampling, "pnp", f"--pnp-features {settings.features:g} and --pnp-attention "
                    f"{settings.attention:g} inject in none of the {sampling.steps} steps")
    texts = {Row("reference", "cond"): "", Row("target", "uncond"): settings.negative_prompt,
             Row("target", "cond"): prompts.target}

    def prepare(sd: StableDiffusion, inversion: Inversion, embeddings: Mapping[str, Tensor], progress: bool) -> Inversion:
        feed = settings.reference_feed
        if feed == "auto":
            feed = "trajectory" if inversion.exact_source else "reconstruction"
        if feed == "trajectory":
            # the target's uncond row is the negative prompt whatever null embeddings the inversion
            # carries (SPDInv's E(src) are for P2P's rows)
            return replace(inversion, null_embeddings=None)
        return reconstruction_feed(sd, inversion, embeddings[prompts.source], feed == "reconstruction-shifted", progress)

    layout = BatchLayout((Row("reference", "cond"), Row("target", "uncond"), Row("target", "cond")))
    return EditPlan(layout, texts, prompts.source, ClassifierFree(sampling.guidance), (controller,), prepare=prepare)


METHOD = EditMethod(
    name="pnp",
    summary="Plug-and-Play: residual features and self-attention Q/K of the source injected into the target",
    settings=PnPSettings,
    plan=plan_pnp,
    aliases=(Alias("plug-and-play"),),
    inversions=("ddim", "direct", "spdinv"),
    # SPDInv's PnP script indexes the latents it hands PnP per step (noisy_latent[-1 - i]), i.e. its
    # inversion trajectory; it passes a single latent there, which fails at the second step
    pairs=(Pair("spdinv+pnp", "spdinv", edit_settings={"reference_feed": "trajectory"}),),
)
