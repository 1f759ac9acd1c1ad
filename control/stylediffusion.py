"""StyleDiffusion's Prompt-to-Prompt editing (Li et al. 2023) as PIE-Bench runs it
(cure-lab/PnPInversion `run_editing_stylediffusion.py`; docs/methods/stylediffusion.md).

Rows u_src, u_tgt, c_src, c_tgt with texts "", "", source, target, the Prompt-to-Prompt controller
of control/p2p.py (refine, or replace, no reweighting) with StyleDiffusion's own windows, and the
inversion's learned value input (samplers.inversion.ValueModulation):
- the source's conditional row attends with the mapped values c_src * a_i + b_i at every step;
- the target's with c_tgt * a_i + b_i for the first tau_v of the run, then with its own text;
- optionally (tau_u, off in PIE-Bench: the reference passes 0, "disable p2pro") the target's
  unconditional row also takes the source's self-attention maps for the first tau_u of the run.
The reference picks the replace mapper when the two prompts have the same number of *characters*
(`len(src.strip()) == len(tgt.strip())`), refine otherwise; `--sd-mapper auto` does the same, except
that it refines where replace is impossible (different word counts), where the reference fails.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from torch import Tensor

from control.base import ControllerBase, StepWindow, parse_window
from control.method import EditMethod, EditPlan, EditPrompts, Pair, Sampling
from control.p2p import P2PSettings, PromptToPrompt, make_p2p, parse_blend, refuse_idle_p2p
from control.words import Bounds
from kernels.attention import fused_attention_rows
from ldm.context import AttnContext, AttnSite, BatchLayout, Row, RunInfo
from ldm.errors import UsageError
from ldm.model import ModelFacts, StableDiffusion
from samplers.guidance import ClassifierFree
from samplers.inversion import Inversion
from samplers.settings import Settings, setting


class UncondSelfReplace(ControllerBase):
    """The target's unconditional row attends with the source's unconditional Q and K in the
    self-attention layers P2P's self rule selects, during `window` (StyleDiffusion's tau_u). Where
    P2P's own self window is open too, the conditional target row takes the source's Q, K in the same
    fused call, so the two rules compose in one layer call."""

    def __init__(self, window: StepWindow, p2p: PromptToPrompt) -> None:
        super().__init__()
        self.window = window
        self.p2p = p2p

    def start(self, run: RunInfo) -> None:
        super().start(run)
        layout = run.layout
        rows = list(range(len(layout)))
        uncond = rows.copy()
        uncond[layout.index("target", "uncond")] = layout.index("source", "uncond")
        both = uncond.copy()
        both[layout.index("target", "cond")] = layout.index("source", "cond")
        self.uncond_rows = (run.row_index(uncond), run.row_index(uncond), run.row_index(rows))
        self.both_rows = (run.row_index(both), run.row_index(both), run.row_index(rows))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor | None:
        if site.kind != "self" or ctx.step not in self.window or not self.p2p.self_rule.matches(site):
            return None
        self._touch(site)
        rows = self.both_rows if ctx.step in self.p2p.self_window else self.uncond_rows
        return fused_attention_rows(q, k, v, *rows)


@dataclass(frozen=True)
class StyleDiffusionP2PSettings(Settings):
    """PIE-Bench's StyleDiffusion run: tau_v 0.5, tau_c 0.6, tau_s 0.6, tau_u 0."""

    value: float = setting(0.5, "fraction of the run in which the target attends with the learned values (tau_v); "
                           "then with its own text", flag="--sd-value", low=0.0, high=1.0)
    cross: Bounds = setting(0.6, "fraction of the run (END or START:END) in which the target's cross-attention maps "
                            "are replaced (tau_c)", flag="--sd-cross", parse=parse_window, metavar="END|START:END",
                            low=0.0, high=1.0)
    self_: Bounds = setting(0.6, "fraction of the run (END or START:END) in which the target's self-attention maps are "
                            "the source's (tau_s)", flag="--sd-self", parse=parse_window, metavar="END|START:END",
                            low=0.0, high=1.0)
    uncond_self: float = setting(0.0, "fraction of the run in which the target's unconditional self-attention maps are "
                                 "the source's (tau_u; PIE-Bench: 0)", flag="--sd-uncond-self", low=0.0, high=1.0)
    mapper: str = setting("auto", "cross-attention map of P2P: auto (the reference's rule: replace when the prompts have "
                          "as many characters and words), refine or replace", flag="--sd-mapper",
                          choices=("auto", "refine", "replace"))
    blend: tuple[str, str] | None = setting(None, "LocalBlend on the word pair \"SOURCE_WORD TARGET_WORD\" (no "
                                            "reweighting; PIE-Bench: none)", flag="--sd-blend", parse=parse_blend,
                                            metavar="\"SRC TGT\"")


def uses_replace(settings: StyleDiffusionP2PSettings, source: str, target: str) -> bool:
    if settings.mapper != "auto":
        return settings.mapper == "replace"
    return len(source.strip(" ")) == len(target.strip(" ")) and len(source.split()) == len(target.split())


def modulated_steps(fraction: float, steps: int) -> int:
    """Steps i with i < steps * fraction, the reference's test (trainer.i is None from then on)."""
    return sum(1 for i in range(steps) if i < steps * fraction)


def plan_stylediffusion_p2p(facts: ModelFacts, prompts: EditPrompts, settings: StyleDiffusionP2PSettings,
                            sampling: Sampling) -> EditPlan:
    steps = sampling.steps
    p2p_settings = P2PSettings(cross=settings.cross, self_=settings.self_, blend=settings.blend, reweight={},
                               replace=uses_replace(settings, prompts.source, prompts.target))
    p2p = make_p2p(facts.tokenizer, prompts.source, prompts.target, steps, p2p_settings)
    window = StepWindow.of(settings.uncond_self, steps)
    controllers: tuple[ControllerBase, ...] = (p2p,)
    if window.end > window.start:
        controllers = (UncondSelfReplace(window, p2p), p2p)
    until = {"source": steps, "target": modulated_steps(settings.value, steps)}
    if until["target"] == 0 and len(controllers) == 1:  # the target row reads nothing learned: P2P must act
        refuse_idle_p2p(facts, p2p, sampling, "stylediffusion-p2p", ("--sd-cross", "--sd-self"))

    def prepare(sd: StableDiffusion, inversion: Inversion, embeddings: Mapping[str, Tensor], progress: bool) -> Inversion:
        if inversion.values is None:
            raise UsageError(f"--control stylediffusion-p2p edits a StyleDiffusion inversion, not a {inversion.method} one")
        return replace(inversion, values=replace(inversion.values, until=until))

    texts = {Row("source", "uncond"): "", Row("target", "uncond"): "",
             Row("source", "cond"): prompts.source, Row("target", "cond"): prompts.target}
    return EditPlan(BatchLayout.cfg(), texts, prompts.source, ClassifierFree(sampling.guidance), controllers,
                    prepare=prepare)


METHOD = EditMethod(
    name="stylediffusion-p2p",
    summary="StyleDiffusion's P2P: the learned values for the source, for the target during tau_v, "
            "P2P refine/replace with tau_c 0.6, tau_s 0.6",
    settings=StyleDiffusionP2PSettings,
    plan=plan_stylediffusion_p2p,
    inversions=("stylediffusion",),
    pairs=(Pair("stylediffusion+p2p"),),
)
