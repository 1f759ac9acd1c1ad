"""Prompt-to-Prompt (Hertz et al. 2022, §3.2 eq. for Edit(M_t, M*_t, t)) as PIE-Bench runs it.

ALGORITHMS.md part B §3.3-§3.7 and §6.4. Rows u_src, u_tgt, c_src, c_tgt (named through the
layout); only the conditional target row is edited:

- self-attention, steps in the self window, levels that are <= 32x32 at 512 px:
  O_tgt = attention(Q_src, K_src, V_tgt), which is "A_tgt := A_src" without building A
  (fused_attention_rows; §6.1);
- cross-attention, every step: A'_tgt = alpha_i * F(A_src, A_tgt) + (1 - alpha_i) * A_tgt, not
  renormalised, O_tgt = A'_tgt V_tgt, with alpha_i the per-token cross-replace schedule and F
  one of the maps below (refine: aligned source columns; replace: source columns through the
  77x77 mapper; reweight: an equalizer on top of refine). Cross maps are N x 77, small.

Steps are the loop's `ctx.step`; nothing is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import torch
from torch import Tensor

from control.base import ControllerBase, SiteRule, StepWindow, attention_probs, replace_rows
from control.local_blend import LocalBlend
from control.words import (
    Bounds,
    cross_replace_schedule,
    equalizer,
    refinement_mapper,
    replacement_mapper,
    require_word,
)
from kernels.attention import fused_attention, fused_attention_rows
from ldm.context import AttnContext, AttnSite
from ldm.tokenizer import MAX_LENGTH, Tokenizer


class CrossEdit(Protocol):
    def __call__(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        """(heads, N, 77) source and target maps -> F(A_src, A_tgt), (heads, N, 77)."""
        ...


@dataclass(frozen=True)
class AttentionRefine:
    """F = alphas * A_src[..., mapper] + (1 - alphas) * A_tgt (§3.6): aligned tokens borrow the source's
    columns, new tokens keep their own."""

    mapper: Tensor  # (77,) long, -1 for target tokens without a source
    alphas: Tensor  # (77,) 1 where mapper is a source position

    def __call__(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        alphas = self.alphas.to(a_src.device)
        return a_src[..., self.mapper.to(a_src.device)] * alphas + a_tgt * (1 - alphas)


@dataclass(frozen=True)
class AttentionReplace:
    """F = A_src M with the (77, 77) replacement mapper (§3.5); word swaps of equal word count."""

    mapper: Tensor

    def __call__(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        return a_src @ self.mapper.to(a_src.device)


@dataclass(frozen=True)
class AttentionReweight:
    """F = eq * inner(A_src, A_tgt), or eq * A_src without an inner edit (§3.7)."""

    equalizer: Tensor  # (77,)
    inner: CrossEdit | None = None

    def __call__(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        base = a_src if self.inner is None else self.inner(a_src, a_tgt)
        return base * self.equalizer.to(a_src.device)


class PromptToPrompt(ControllerBase):
    """The P2P controller: self replacement, cross edit, and an optional LocalBlend."""

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
        self.cross_alpha = cross_alpha  # (num_steps + 1, 77)
        self.self_window = self_window
        self.self_rule = self_rule
        self.local_blend = local_blend

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor:
        src = ctx.layout.index("source", "cond")
        tgt = ctx.layout.index("target", "cond")
        if site.kind == "self":
            if ctx.step in self.self_window and self.self_rule.matches(site):
                self._touch(site)
                qk_rows = list(range(q.shape[0]))
                qk_rows[tgt] = src
                return fused_attention_rows(q, k, v, qk_rows, qk_rows, list(range(q.shape[0])))
            return fused_attention(q, k, v)

        alpha_cpu = self.cross_alpha[ctx.step]  # (77,) over target token columns
        editing = bool(alpha_cpu.any())  # decided on the CPU copy: no device sync per call
        alpha = alpha_cpu.to(q.device)
        storing = self.local_blend is not None and self.local_blend.wants(site)
        if not (editing or storing):
            return fused_attention(q, k, v)
        out = fused_attention(q, k, v)
        a_src = attention_probs(q[src], k[src])  # (heads, N, 77)
        a_tgt = attention_probs(q[tgt], k[tgt])
        if editing:
            self._touch(site)
            a_tgt = self.edit(a_src, a_tgt) * alpha + (1 - alpha) * a_tgt
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

    def reset(self) -> None:
        super().reset()
        if self.local_blend is not None:
            self.local_blend.reset()


@dataclass(frozen=True)
class P2PSettings:
    """PIE-Bench's P2P defaults (ALGORITHMS.md B §3.2, §7)."""

    replace: bool = False  # PIE never passes is_replace_controller: refine for every edit
    cross: Bounds | Mapping[str, Bounds] = 0.4
    self_: Bounds = 0.6
    blend: tuple[str, str] | None = None  # (source word, target word)
    reweight: Mapping[str, float] | None = None  # target word -> weight; a blend implies {tgt: 2}
    blend_start: float = 0.2
    blend_threshold: float = 0.3
    blend_level: int = 2  # 16x16 at 512 px
    self_min_level: int = 1  # <= 32x32 at 512 px


def make_p2p(tokenizer: Tokenizer, source: str, target: str, num_steps: int, settings: P2PSettings) -> PromptToPrompt:
    """The reference's make_controller: refine (or replace), wrapped in reweight when a blend word or
    explicit weights are given, sharing one LocalBlend. Absent words are errors, not no-ops."""
    if settings.replace:
        edit: CrossEdit = AttentionReplace(replacement_mapper(tokenizer, source, target))
    else:
        edit = AttentionRefine(*refinement_mapper(tokenizer, source, target))
    weights = settings.reweight
    if weights is None and settings.blend is not None:
        weights = {settings.blend[1]: 2.0}
    if weights:
        edit = AttentionReweight(equalizer(tokenizer, target, weights), edit)
    blend = None
    if settings.blend is not None:
        cols = []
        for prompt, word, which in ((source, settings.blend[0], "source"), (target, settings.blend[1], "target")):
            c = torch.zeros(MAX_LENGTH)
            c[require_word(tokenizer, prompt, word, f"blend ({which} prompt)")] = 1.0
            cols.append(c)
        blend = LocalBlend(cols[0], cols[1], int(settings.blend_start * num_steps), settings.blend_threshold,
                           settings.blend_level)
    return PromptToPrompt(
        edit,
        cross_replace_schedule(tokenizer, target, num_steps, settings.cross),
        StepWindow.of(settings.self_, num_steps),
        blend,
        SiteRule(kind="self", min_level=settings.self_min_level),
    )
