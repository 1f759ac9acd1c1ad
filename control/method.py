"""How an editing method declares itself, and the plan it makes for one edit.

Every editing method is a module of this package exporting `METHOD = EditMethod(...)`: its name and
the reference's names for it, its settings (a frozen `Settings` dataclass whose defaults are the
reference's), the inversions it works with, and a `plan` function. `plan(facts, prompts, settings,
sampling)` turns one edit request into an `EditPlan`: which batch rows the loop runs and with
which text, the prompt the image is inverted with, the controllers, the guidance and any step
hooks. A plan needs only the model's tokenizer and sites (`ModelFacts`), never its weights, so
every word, prompt and layer choice is checked before anything is loaded or computed; a method
whose settings would make it touch nothing refuses here.

The dispatcher (evaluation/api.py) runs every plan the same way; nothing outside a method's module
knows what the method does (docs/architecture.md "Adding a method").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from torch import Tensor

from ldm.context import AttnSite, BatchLayout, Controller, Row
from ldm.errors import UsageError
from ldm.model import ModelFacts, StableDiffusion
from samplers.guidance import Guidance
from samplers.inversion import Inversion
from samplers.loop import StepHook
from samplers.settings import Alias, Settings


@dataclass(frozen=True)
class EditPrompts:
    """The two prompts of an edit, cleaned (PIE-Bench's [ ] markers removed, whitespace normalised)."""

    source: str
    target: str


@dataclass(frozen=True)
class Sampling:
    """The run-level settings every method sees: DDIM steps and the CFG scale of the edit."""

    steps: int = 50
    guidance: float = 7.5
    allow_idle: bool = False  # let settings that idle the method run (an ablation's baseline); see refuse_idle


# prepare(sd, inversion, embeddings by prompt text, progress) -> the inversion the loop should read
Prepare = Callable[[StableDiffusion, Inversion, Mapping[str, Tensor], bool], Inversion]
# resolve(settings, photo (H, W, 3) uint8) -> the settings with what depends on the photo filled in
Resolve = Callable[[Settings, np.ndarray], Settings]


@dataclass(frozen=True)
class EditPlan:
    """Everything the dispatcher needs to run one edit of a method.

    layout: the named batch rows of the UNet call; prompts: the text of every row (the null rows of
        null-text / negative-prompt inversions are replaced by the inversion's embeddings in the loop).
    inversion_prompt: the prompt the image is inverted with (MasaCtrl: "").
    controllers: in composition order (ldm/context.py); guidance: how each role's rows combine.
    hooks: step hooks that may take gradients before each UNet call (samplers/loop.py).
    prepare: an optional transformation of the inversion before the loop (Plug-and-Play feeds its
        reference row from a reconstruction when the inversion does not pin the source). UNet rows
        it spends are what the returned inversion's cost adds to the given one's.
    """

    layout: BatchLayout
    prompts: Mapping[Row, str]
    inversion_prompt: str
    guidance: Guidance
    controllers: tuple[Controller, ...] = ()
    hooks: tuple[StepHook, ...] = ()
    prepare: Prepare | None = None

    def __post_init__(self) -> None:
        missing = [row for row in self.layout.rows if row not in self.prompts]
        if missing:
            raise ValueError(f"the plan gives no prompt for rows {missing} of {self.layout}")


def refuse_idle(sampling: Sampling, method: str, why: str, part: str = "") -> None:
    """A plan's refusal of settings under which its method (or the named `part` of it) would touch
    nothing: the run would quietly be the edit without that control (`--control none` is the
    documented way to ask for no attention control) while its output and run.json name this
    method. `why` names the option(s) at fault. An API caller that wants exactly that run (the
    idle baseline of an ablation) says so with `allow_idle` (EditSpec), which run.json records."""
    if sampling.allow_idle:
        return
    what = f"its {part}" if part else "it"
    raise UsageError(f"--control {method}: {why}, so {what} would edit nothing "
                     "(for an edit without attention control, use --control none)")


def site_range(sites: Iterable[AttnSite], attr: str, kind: str | None = None) -> str:
    """"LO..HI" of a site attribute (index, level) over the model's sites of a kind, for messages."""
    values = [getattr(s, attr) for s in sites if kind is None or s.kind == kind]
    return f"{min(values)}..{max(values)}" if values else "none"


PlanFn = Callable[[ModelFacts, EditPrompts, Settings, Sampling], EditPlan]


@dataclass(frozen=True)
class Pair:
    """A reference "<inversion>+<edit>" name that means this editing method although its edit part
    names another (StyleDiffusion's P2P variant is its "stylediffusion+p2p"), or whose inversion
    part means a particular inversion (pix2pix-zero's "ddim" is its own regularised inversion).

    inversion: the inversion method's name, None for the name's own first part; settings: the
    inversion settings (and run settings: guidance, steps) the name implies; with `pattern`, `name`
    is a regular expression matched against the whole pair name and `settings` a function of the
    match (DirectInversion's guidance ablation, "directinversion+p2p_guidance_{i}_{f}");
    edit_settings: this method's settings the name implies (SPDInv's P2P runs with proximal and
    inversion guidance, "spdinv+p2p")."""

    name: str
    inversion: str | None = None
    settings: Mapping[str, Any] | Callable[[re.Match[str]], Mapping[str, Any]] = field(default_factory=dict)
    edit_settings: Mapping[str, Any] = field(default_factory=dict)
    pattern: bool = False

    def match(self, name: str) -> dict[str, Any] | None:
        """The implied settings if `name` is this pair's, else None."""
        return Alias(self.name, self.settings, self.pattern).match(name)


@dataclass(frozen=True)
class EditMethod:
    """An editing method as the registry, the command line and the benchmark runner see it.

    name: the command-line name (`--control NAME`); aliases: the reference's index names, maybe
        implying settings (e.g. "proximal-guidance" = p2p with --prox l0).
    inversions: the inversion methods this one works with (None: any).
    pairs: the reference's "<inversion>+<edit>" names that mean this method (see `Pair`).
    resolve: fills in the settings that depend on the photo before the plan is made (pix2pix-zero's
        caption from a BLIP captioner); the edit runs, and records, the resolved settings.
    """

    name: str
    summary: str
    settings: type[Settings]
    plan: PlanFn
    aliases: tuple[Alias, ...] = ()
    inversions: tuple[str, ...] | None = None
    notes: tuple[str, ...] = field(default=())  # extra lines for `invedit methods`
    pairs: tuple["Pair", ...] = ()
    resolve: Resolve | None = None
