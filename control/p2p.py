"""Prompt-to-Prompt (Hertz et al. 2022, §3.2 eq. for Edit(M_t, M*_t, t)) as PIE-Bench runs it.

docs/methods/prompt-to-prompt.md. Rows u_src, u_tgt, c_src, c_tgt (named through the layout);
only the conditional target row is edited:

- self-attention, steps in the self window, levels that are <= 32x32 at 512 px:
  O_tgt = attention(Q_src, K_src, V_tgt), which is "A_tgt := A_src" without building A
  (fused_attention_rows);
- cross-attention, every step: A'_tgt = alpha_i * F(A_src, A_tgt) + (1 - alpha_i) * A_tgt, not
  renormalised, O_tgt = A'_tgt V_tgt, with alpha_i the per-token cross-replace schedule and F
  one of the maps below (refine: aligned source columns; replace: source columns through the
  77x77 mapper; reweight: an equalizer on top of refine). Cross maps are N x 77, small.

Steps are the loop's `ctx.step`; nothing is counted. The method (`METHOD`, names "p2p",
"p2p-replace", "proximal-guidance") also carries ProxEdit's proximal guidance as an option, since
the reference uses it with P2P only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Protocol

import torch
from torch import Tensor

from control.base import ControllerBase, SiteRule, StepWindow, attention_probs, parse_window, replace_rows
from control.local_blend import LocalBlend
from control.method import EditMethod, EditPlan, EditPrompts, Pair, Sampling, refuse_idle, site_range
from control.words import (
    Bounds,
    cross_replace_schedule,
    equalizer,
    refinement_mapper,
    replacement_mapper,
    require_word,
)
from kernels.attention import fused_attention, fused_attention_rows
from ldm.context import AttnContext, AttnSite, BatchLayout, Row, RunInfo
from ldm.errors import UsageError
from ldm.model import ModelFacts
from ldm.tokenizer import MAX_LENGTH, Tokenizer
from samplers.guidance import ClassifierFree, Guidance
from samplers.prox import Proximal
from samplers.settings import Alias, Settings, setting


class CrossEdit(Protocol):
    def __call__(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        """(heads, N, 77) source and target maps -> F(A_src, A_tgt), (heads, N, 77)."""
        ...

    def to(self, device: torch.device) -> "CrossEdit":
        """The same edit with its tensors on `device` (moved once per run, not per attention call)."""
        ...


@dataclass(frozen=True)
class AttentionRefine:
    """F = alphas * A_src[..., mapper] + (1 - alphas) * A_tgt ("Refine"): aligned tokens borrow the source's
    columns, new tokens keep their own."""

    mapper: Tensor  # (77,) long, -1 for target tokens without a source
    alphas: Tensor  # (77,) 1 where mapper is a source position

    def __call__(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        alphas = self.alphas.to(a_src.device)
        return a_src[..., self.mapper.to(a_src.device)] * alphas + a_tgt * (1 - alphas)

    def to(self, device: torch.device) -> "AttentionRefine":
        return AttentionRefine(self.mapper.to(device), self.alphas.to(device))


@dataclass(frozen=True)
class AttentionReplace:
    """F = A_src M with the (77, 77) replacement mapper ("Replace"); word swaps of equal word count."""

    mapper: Tensor

    def __call__(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        return a_src @ self.mapper.to(a_src.device)

    def to(self, device: torch.device) -> "AttentionReplace":
        return AttentionReplace(self.mapper.to(device))


@dataclass(frozen=True)
class AttentionReweight:
    """F = eq * inner(A_src, A_tgt), or eq * A_src without an inner edit ("Reweight")."""

    equalizer: Tensor  # (77,)
    inner: CrossEdit | None = None

    def __call__(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        base = a_src if self.inner is None else self.inner(a_src, a_tgt)
        return base * self.equalizer.to(a_src.device)

    def to(self, device: torch.device) -> "AttentionReweight":
        return AttentionReweight(self.equalizer.to(device), None if self.inner is None else self.inner.to(device))


class PromptToPrompt(ControllerBase):
    """The P2P controller: self replacement, cross edit, and an optional LocalBlend."""

    reads_uncond_rows = False  # the references edit and store the conditional half only

    def __init__(
        self,
        edit: CrossEdit,
        cross_alpha: Tensor,
        self_window: StepWindow,
        local_blend: LocalBlend | None = None,
        self_rule: SiteRule = SiteRule(kind="self", min_level=1),
    ) -> None:
        super().__init__()
        self.edit = edit
        self.cross_alpha = cross_alpha  # (num_steps + 1, 77) on the CPU: decides without a device sync
        self.self_window = self_window
        self.self_rule = self_rule
        self.local_blend = local_blend

    def start(self, run: RunInfo) -> None:
        super().start(run)
        layout = run.layout
        self.src, self.tgt = layout.index("source", "cond"), layout.index("target", "cond")
        rows = list(range(len(layout)))
        qk = [self.src if i == self.tgt else i for i in rows]
        self.self_rows = (run.row_index(qk), run.row_index(qk), run.row_index(rows))  # target reads Q, K of the source
        self.alpha_device = self.cross_alpha.to(run.device)
        self.edit_device = self.edit.to(run.device)  # its mappers and weights, once per run
        if self.local_blend is not None:
            self.local_blend.start(run.device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor | None:
        if site.kind == "self":
            if ctx.step in self.self_window and self.self_rule.matches(site):
                self._touch(site)
                return fused_attention_rows(q, k, v, *self.self_rows)
            return None
        editing = bool(self.cross_alpha[ctx.step].any())  # decided on the CPU copy
        storing = self.local_blend is not None and self.local_blend.wants(site)
        if not (editing or storing):
            return None
        src, tgt = self.src, self.tgt
        out = fused_attention(q, k, v)
        a_src = attention_probs(q[src], k[src])  # (heads, N, 77)
        a_tgt = attention_probs(q[tgt], k[tgt])
        if editing:
            self._touch(site)
            alpha = self.alpha_device[ctx.step]  # (77,) over target token columns
            a_tgt = self.edit_device(a_src, a_tgt) * alpha + (1 - alpha) * a_tgt
            out = replace_rows(out, {tgt: a_tgt @ v[tgt].float()})
        if storing:
            assert self.local_blend is not None
            self.local_blend.store(site, a_src, a_tgt)
        return out

    def end_step(self, ctx: AttnContext, latents: Tensor) -> Tensor:
        if self.local_blend is None:
            return latents
        return self.local_blend.blend(
            ctx.step, latents, ctx.layout.latent_index("source"), ctx.layout.latent_index("target")
        )


def parse_blend(text: str) -> tuple[str, str] | None:
    """"SOURCE_WORD TARGET_WORD" -> (source word, target word); an empty string (PIE-Bench's empty
    blended_word) -> None."""
    words = text.split()
    if not words:
        return None
    if len(words) != 2:
        raise ValueError("expected two words, the source word and the target word")
    return words[0], words[1]


def parse_word_value(item: str) -> tuple[str, float]:
    """WORD=VALUE -> (word, value), e.g. cake=2."""
    word, sep, value = item.rpartition("=")
    if not (sep and word):
        raise ValueError("expected WORD=VALUE, e.g. cake=2")
    return word, float(value)


def parse_word_window(item: str) -> tuple[str, tuple[float, float]]:
    """WORD=END or WORD=START:END (fractions of the run) -> (word, (start, end))."""
    word, sep, value = item.rpartition("=")
    if not (sep and word):
        raise ValueError("expected WORD=END or WORD=START:END, e.g. cake=0.2:0.6")
    window = parse_window(value)
    return word, (0.0, window) if isinstance(window, float) else window


@dataclass(frozen=True)
class P2PSettings(Settings):
    """PIE-Bench's P2P defaults (docs/methods/prompt-to-prompt.md)."""

    cross: Bounds = setting(0.4, "fraction of the run (END or START:END) in which the target's cross-attention "
                            "maps are replaced", parse=parse_window, metavar="END|START:END", low=0.0, high=1.0)
    self_: Bounds = setting(0.6, "fraction of the run (END or START:END) in which the target's self-attention "
                            "maps are the source's", flag="--self", parse=parse_window, metavar="END|START:END",
                            low=0.0, high=1.0)
    cross_words: Mapping[str, tuple[float, float]] | None = setting(
        None, "a target word's own cross-attention window, overriding --cross for its tokens (repeatable)",
        flag="--cross-word", parse=parse_word_window, repeat="dict", metavar="WORD=START:END", low=0.0, high=1.0)
    blend: tuple[str, str] | None = setting(
        None, "LocalBlend on the word pair \"SOURCE_WORD TARGET_WORD\"; also reweights the target word x2 "
        "unless --reweight is given", parse=parse_blend, metavar="\"SRC TGT\"")
    reweight: Mapping[str, float] | None = setting(
        None, "scale a target word's cross-attention (repeatable)", parse=parse_word_value, repeat="dict",
        metavar="WORD=VALUE")
    replace: bool = setting(False, "the replace mapper (word swaps of equal word count) instead of refine")
    prox: str | None = setting(None, "proximal guidance (ProxEdit): threshold the guidance direction, l0 or l1",
                               choices=("l0", "l1"))
    quantile: float = setting(0.75, "proximal guidance: the quantile of |eps_c - eps_u| used as threshold",
                              low=0.0, high=1.0)
    inversion_guidance: int = setting(0, "proximal guidance: below this timestep pull the latents back to the "
                                      "inversion trajectory where the thresholded direction is small (ProxEdit's "
                                      "inversion guidance; SPDInv's P2P uses 400); 0: off", metavar="T", low=0)
    recon_lr: float = setting(1.0, "inversion guidance: the fraction of the way back to the trajectory", low=0.0,
                              high=1.0)
    replace_if_same_length: bool = setting(False, "the replace mapper when the prompts have the same number of "
                                           "words, else refine (the edit-friendly reference's choice)")
    blend_start: float = setting(0.2, "LocalBlend starts after this fraction of the run", low=0.0, high=1.0)
    blend_threshold: float = setting(0.3, "LocalBlend mask threshold on the max-normalised attention", low=0.0, high=1.0)
    blend_level: int = setting(2, "UNet level whose cross-attention maps LocalBlend reads (2 = 16x16 at 512 px)", low=0)
    self_min_level: int = setting(1, "self-attention replacement only at this level and coarser (1 = <= 32x32 at 512 px)",
                                  low=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inversion_guidance and self.prox is None:
            raise UsageError("--inversion-guidance reads proximal guidance's thresholded direction; give --prox too")
        for flag, window in (("--cross", self.cross), ("--self", self.self_), *(
                (f"--cross-word {w}", b) for w, b in (self.cross_words or {}).items())):
            if isinstance(window, tuple) and window[0] > window[1]:
                raise UsageError(f"{flag} {window[0]:g}:{window[1]:g}: the window starts after it ends")


def make_p2p(tokenizer: Tokenizer, source: str, target: str, num_steps: int, settings: P2PSettings) -> PromptToPrompt:
    """The reference's make_controller: refine (or replace), wrapped in reweight when a blend word or
    explicit weights are given, sharing one LocalBlend. Absent words are errors, not no-ops."""
    if settings.replace or (settings.replace_if_same_length and len(source.split(" ")) == len(target.split(" "))):
        edit: CrossEdit = AttentionReplace(replacement_mapper(tokenizer, source, target))
    else:
        edit = AttentionRefine(*refinement_mapper(tokenizer, source, target))
    blend = None
    if settings.blend is not None:  # its words first: a missing one is named as the blend word it is
        cols = []
        for prompt, word, which in ((source, settings.blend[0], "source"), (target, settings.blend[1], "target")):
            c = torch.zeros(MAX_LENGTH)
            c[require_word(tokenizer, prompt, word, f"--blend {which}")] = 1.0
            cols.append(c)
        blend = LocalBlend(cols[0], cols[1], int(settings.blend_start * num_steps), settings.blend_threshold,
                           settings.blend_level)
    weights = settings.reweight
    if weights is None and settings.blend is not None:
        weights = {settings.blend[1]: 2.0}
    if weights:
        edit = AttentionReweight(equalizer(tokenizer, target, weights), edit)
    cross: Bounds | dict[str, Bounds] = settings.cross
    if settings.cross_words:
        cross = {"default_": settings.cross, **settings.cross_words}
    return PromptToPrompt(
        edit,
        cross_replace_schedule(tokenizer, target, num_steps, cross),
        StepWindow.of(settings.self_, num_steps),
        blend,
        SiteRule(kind="self", min_level=settings.self_min_level),
    )


def refuse_idle_p2p(facts: ModelFacts, p2p: PromptToPrompt, sampling: Sampling, method: str,
                    flags: tuple[str, str] = ("--cross", "--self"), guided: bool = False) -> None:
    """Refuse a LocalBlend that can never blend, self replacement at a level the model does not
    have, and windows that leave the controller nothing to do in any step (refuse_idle); `guided`:
    the method changes the target otherwise too (proximal guidance), so empty windows are allowed."""
    sites, steps = facts.attn_sites, sampling.steps
    self_steps = any(i in p2p.self_window for i in range(steps))
    if self_steps and not any(p2p.self_rule.matches(s) for s in sites):
        refuse_idle(sampling, method, f"--self-min-level {p2p.self_rule.min_level} is coarser than every "
                    f"self-attention level of the model ({site_range(sites, 'level', 'self')})",
                    "self-attention replacement")
    blend = p2p.local_blend
    if blend is not None:
        if not any(blend.wants(s) for s in sites):
            levels = site_range([s for s in sites if s.place != "mid"], "level", "cross")
            refuse_idle(sampling, method, f"--blend-level {blend.level}: LocalBlend reads the cross-attention of "
                        f"down and up blocks, at levels {levels}", "LocalBlend")
        if blend.start_step >= steps:
            refuse_idle(sampling, method, f"LocalBlend starts at step {blend.start_step} (--blend-start), after the "
                        f"run's last step {steps - 1}", "LocalBlend")
    if not (self_steps or bool(p2p.cross_alpha[:steps].any()) or blend is not None or guided):
        refuse_idle(sampling, method, f"the {flags[0]} and {flags[1]} windows hold none of the {steps} steps")


def guidance_of(settings: P2PSettings, scale: float) -> Guidance:
    """Plain CFG, or ProxEdit's proximal guidance when --prox is given."""
    if settings.prox is None:
        return ClassifierFree(scale)
    return Proximal(scale, settings.quantile, settings.prox, settings.inversion_guidance,  # type: ignore[arg-type]
                    settings.recon_lr)


def plan_p2p(facts: ModelFacts, prompts: EditPrompts, settings: P2PSettings, sampling: Sampling) -> EditPlan:
    """Rows [u_src, u_tgt, c_src, c_tgt] with texts ["", "", source, target]; invert with the source."""
    controller = make_p2p(facts.tokenizer, prompts.source, prompts.target, sampling.steps, settings)
    refuse_idle_p2p(facts, controller, sampling, "p2p", guided=settings.prox is not None)
    texts = {Row("source", "uncond"): "", Row("target", "uncond"): "",
             Row("source", "cond"): prompts.source, Row("target", "cond"): prompts.target}
    return EditPlan(BatchLayout.cfg(), texts, prompts.source, guidance_of(settings, sampling.guidance), (controller,))


GUIDANCE_TOKENS = {"0": 0.0, "1": 1.0, "25": 2.5, "5": 5.0, "75": 7.5}  # as the reference's names spell them


def guidance_pair(m: re.Match[str]) -> dict[str, float]:
    """directinversion+p2p_guidance_{i}_{f}: inversion guidance i, the run's guidance f."""
    return {"inversion_guidance": GUIDANCE_TOKENS[m[1]], "guidance": GUIDANCE_TOKENS[m[2]]}


METHOD = EditMethod(
    name="p2p",
    summary="Prompt-to-Prompt: refine (or --replace) cross-attention, self-attention from the source, "
            "optional LocalBlend / reweight / proximal guidance",
    settings=P2PSettings,
    plan=plan_p2p,
    aliases=(Alias("p2p-refine"), Alias("p2p-replace", {"replace": True}), Alias("prompt-to-prompt"),
             Alias("proximal-guidance", {"prox": "l0"})),
    # the reference runner's guidance ablation: DirectInversion inverted under CFG scale i, offsets
    # and edit at f (tokens 0, 1, 25, 5, 75 = 0, 1, 2.5, 5, 7.5); SPDInv's and edit-friendly's pairs
    # as leeruibin/SPDInv run_SPDInv_P2P.py (P2P/ptp_utils.py diffusion_step) and PnP Inversion's
    # run_editing_edit_friendly_p2p.py (models/edit_friendly_ddm/ptp_classes.py: self at <= 16x16)
    pairs=(Pair(r"directinversion\+p2p_guidance_(0|1|25|5|75)_(0|1|25|5|75)", "direct", guidance_pair, pattern=True),
           Pair("spdinv+p2p", "spdinv", edit_settings={"prox": "l0", "quantile": 0.7, "inversion_guidance": 400,
                                                        "cross": 0.8}),
           Pair("edit-friendly-inversion+p2p", "edit-friendly",
                edit_settings={"replace_if_same_length": True, "self_min_level": 2})),
)
