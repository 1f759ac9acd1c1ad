"""MasaCtrl: mutual self-attention control (Cao et al. 2023, §4.2, eq. 4) as PIE-Bench runs it.

docs/methods/masactrl.md. From step `start_step` on, in the self-attention of every transformer
block numbered `start_layer` or later (the reference's layer index: blocks in execution order,
which is image-size independent; 10..15 are the decoder's 32x32 and 64x64 blocks of SD-1.4),
each target row queries the keys and values of the source row of the same CFG half:
O_tgt = attention(Q_tgt, K_src, V_src). Source rows and cross-attention are untouched. One fused
call with gathered rows; the 4096 x 4096 map is never built.

As in the reference, the source branch and the inversion use the empty prompt unless
`--masactrl-source-prompt` asks for the source prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from control.base import ControllerBase
from control.method import EditMethod, EditPlan, EditPrompts, Pair, Sampling, refuse_idle, site_range
from kernels.attention import fused_attention_rows
from ldm.context import AttnContext, AttnSite, BatchLayout, Row, RunInfo
from ldm.model import ModelFacts
from samplers.guidance import ClassifierFree, Guidance, RoleScales
from samplers.prox import Proximal
from samplers.settings import Alias, Settings, setting


class MutualSelfAttention(ControllerBase):
    def __init__(self, start_step: int = 4, start_layer: int = 10) -> None:
        super().__init__()
        self.start_step = start_step
        self.start_layer = start_layer

    def start(self, run: RunInfo) -> None:
        super().start(run)
        layout = run.layout
        rows = list(range(len(layout)))
        kv = rows.copy()
        for branch in ("uncond", "cond"):
            if layout.has("target", branch):
                kv[layout.index("target", branch)] = layout.index("source", branch)
        self.rows = (run.row_index(rows), run.row_index(kv), run.row_index(kv))  # Q own, K and V of the source

    def active(self, site: AttnSite, step: int) -> bool:
        return site.kind == "self" and step >= self.start_step and site.index >= self.start_layer

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor | None:
        if not self.active(site, ctx.step):
            return None
        self._touch(site)
        return fused_attention_rows(q, k, v, *self.rows)


@dataclass(frozen=True)
class MasaCtrlSettings(Settings):
    start_step: int = setting(4, "first denoising step with mutual self-attention", flag="--masactrl-step", low=0)
    start_layer: int = setting(10, "first transformer block (execution order) with mutual self-attention",
                               flag="--masactrl-layer", low=0)
    source_prompt: bool = setting(False, "invert and denoise the source branch with --source instead of the empty "
                                  "prompt (the reference uses \"\")", flag="--masactrl-source-prompt")
    source_guidance: float | None = setting(None, "the source branch's own CFG scale (SPDInv's MasaCtrl: 1); default: "
                                            "--guidance for both branches", flag="--masactrl-source-guidance")
    prox: str | None = setting(None, "proximal guidance (ProxEdit) on the target branch alone, l0 or l1, as SPDInv's "
                               "MasaCtrl pipeline runs it", flag="--masactrl-prox", choices=("l0", "l1"))
    quantile: float = setting(0.6, "--masactrl-prox: the quantile of the target's |eps_c - eps_u| used as threshold",
                              flag="--masactrl-quantile", low=0.0, high=1.0)


def plan_masactrl(facts: ModelFacts, prompts: EditPrompts, settings: MasaCtrlSettings, sampling: Sampling) -> EditPlan:
    source = prompts.source if settings.source_prompt else ""
    texts = {Row("source", "uncond"): "", Row("target", "uncond"): "",
             Row("source", "cond"): source, Row("target", "cond"): prompts.target}
    if settings.start_step >= sampling.steps:
        refuse_idle(sampling, "masactrl", f"--masactrl-step {settings.start_step} starts at or after the run's "
                    f"last step (steps 0..{sampling.steps - 1})")
    if not any(s.kind == "self" and s.index >= settings.start_layer for s in facts.attn_sites):
        refuse_idle(sampling, "masactrl", f"--masactrl-layer {settings.start_layer} is beyond the model's "
                    f"transformer blocks ({site_range(facts.attn_sites, 'index', 'self')})")
    controller = MutualSelfAttention(settings.start_step, settings.start_layer)
    guidance: Guidance = ClassifierFree(sampling.guidance)
    if settings.prox is not None:
        guidance = Proximal(sampling.guidance, settings.quantile, settings.prox)  # type: ignore[arg-type]
    if settings.source_guidance is not None:  # the source at its own scale, the rest (the target) as above
        guidance = RoleScales(guidance, {"source": settings.source_guidance})
    return EditPlan(BatchLayout.cfg(), texts, source, guidance, (controller,))


METHOD = EditMethod(
    name="masactrl",
    summary="MasaCtrl: target queries attend to the source's keys and values (self-attention, late blocks, "
            "from step 4)",
    settings=MasaCtrlSettings,
    plan=plan_masactrl,
    aliases=(Alias("mutual-self-attention"),),
    # as leeruibin/SPDInv run_SPDInv_MasaCtrl.py: the source prompt, guidance [1, w], l0 proximal
    # guidance (quantile 0.6) on the target, E("") as its null embedding (npi_interp 1)
    pairs=(Pair("spdinv+masactrl", "spdinv", {"interp": 1.0},
                {"source_prompt": True, "source_guidance": 1.0, "prox": "l0", "quantile": 0.6}),),
)
