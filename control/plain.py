"""The edit without attention control: both branches denoised from the inversion with their own
prompts, nothing shared between them (the reference's "direct synthesis" and the baseline every
controller is measured against; "direct_forward" is the reference's name for it after EDICT's
inversion, `edict+direct_forward`)."""

from __future__ import annotations

from control.method import EditMethod, EditPlan, EditPrompts, Sampling
from ldm.context import BatchLayout, Row
from ldm.model import ModelFacts
from samplers.guidance import ClassifierFree
from samplers.settings import Alias, NoSettings


def plan_plain(facts: ModelFacts, prompts: EditPrompts, settings: NoSettings, sampling: Sampling) -> EditPlan:
    texts = {Row("source", "uncond"): "", Row("target", "uncond"): "",
             Row("source", "cond"): prompts.source, Row("target", "cond"): prompts.target}
    return EditPlan(BatchLayout.cfg(), texts, prompts.source, ClassifierFree(sampling.guidance))


METHOD = EditMethod(
    name="none",
    summary="no attention control: the target is denoised from the inversion under its own prompt",
    settings=NoSettings,
    plan=plan_plain,
    aliases=(Alias("plain"), Alias("direct-synthesis"), Alias("direct_forward")),
)
