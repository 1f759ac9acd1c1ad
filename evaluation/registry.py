"""The registry of methods: every inversion and editing method, by name and by the reference's names.

One line per method in `INVERSIONS` / `EDITS` below is all a new method needs outside its own
module (docs/architecture.md "Adding a method"). A `Registry` is an immutable value: the command
line, the editing API and the benchmark runner are handed one, and `with_inversion` / `with_edit`
return a new registry with one more method (a test can add its own method without touching any
file, and nothing global changes).

Names: a method is found by its name or any of its aliases; an alias may imply settings (e.g.
"proximal-guidance" is Prompt-to-Prompt with --prox l0) or be a pattern (the reference's
parametrised ablation names). A pair name "<inversion>+<edit>" (the reference's index names, e.g.
"directinversion+p2p", "null-text-inversion+proximal-guidance") names both at once. Alias
settings that are not the method's own but the run's ("guidance", "steps") apply to the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from control import masactrl, p2p, pix2pix_zero, plain, pnp, stylediffusion as stylediffusion_p2p
from control.method import EditMethod
from inversion import ddim, direct, edict, edit_friendly, negative_prompt, null_text, spdinv, stylediffusion
from inversion import pix2pix_zero as pix2pix_zero_inversion
from inversion.method import InversionMethod
from evaluation.api import EditSpec, InversionSpec
from ldm.errors import UsageError
from samplers.settings import Alias, Settings, setting_fields

INVERSIONS: tuple[InversionMethod, ...] = (
    ddim.METHOD,
    direct.METHOD,
    negative_prompt.METHOD,
    null_text.METHOD,
    stylediffusion.METHOD,
    pix2pix_zero_inversion.METHOD,
    edict.METHOD,
    spdinv.METHOD,
    edit_friendly.METHOD,
)
EDITS: tuple[EditMethod, ...] = (
    p2p.METHOD,
    masactrl.METHOD,
    pnp.METHOD,
    plain.METHOD,
    stylediffusion_p2p.METHOD,
    pix2pix_zero.METHOD,
)
RUN_KEYS = ("steps", "guidance", "seed")  # settings that belong to the run, not to a method


@dataclass(frozen=True)
class Choice:
    """A method found by name, with the settings its name implies (method's own, and the run's)."""

    method: Any  # InversionMethod | EditMethod
    settings: Mapping[str, Any] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairChoice:
    inversion: Choice
    edit: Choice

    @property
    def run(self) -> dict[str, Any]:
        return {**self.inversion.run, **self.edit.run}


def _split(method: Any, implied: Mapping[str, Any]) -> Choice:
    own = {f.name for f in setting_fields(method.settings)}
    settings = {k: v for k, v in implied.items() if k in own}
    run = {k: v for k, v in implied.items() if k in RUN_KEYS}
    unknown = set(implied) - set(settings) - set(run)
    if unknown:
        raise ValueError(f"an alias of {method.name!r} sets unknown settings {sorted(unknown)}")
    return Choice(method, settings, run)


def _find(methods: Sequence[Any], name: str, kind: str) -> Choice:
    for method in methods:
        if name == method.name:
            return Choice(method)
        for alias in method.aliases:
            implied = alias.match(name)
            if implied is not None:
                return _split(method, implied)
    names = ", ".join(m.name for m in methods)
    raise UsageError(f"unknown {kind} {name!r}; choose from {names} (or a name `invedit methods` lists)")


@dataclass(frozen=True)
class Registry:
    inversions: tuple[InversionMethod, ...] = INVERSIONS
    edits: tuple[EditMethod, ...] = EDITS

    def __post_init__(self) -> None:
        for kind, methods in (("inversion", self.inversions), ("editing", self.edits)):
            names = [m.name for m in methods]
            if len(set(names)) != len(names):
                raise ValueError(f"two {kind} methods share a name: {names}")
        flags: dict[str, str] = {}
        for method in (*self.inversions, *self.edits):
            for f in setting_fields(method.settings):
                if flags.setdefault(f.flag, method.name) != method.name:
                    raise ValueError(f"{method.name} and {flags[f.flag]} both declare the option {f.flag}")

    def with_inversion(self, method: InversionMethod) -> "Registry":
        return Registry(self.inversions + (method,), self.edits)

    def with_edit(self, method: EditMethod) -> "Registry":
        return Registry(self.inversions, self.edits + (method,))

    def inversion(self, name: str) -> Choice:
        return _find(self.inversions, name, "inversion")

    def edit(self, name: str) -> Choice:
        return _find(self.edits, name, "editing method")

    def pair(self, name: str) -> PairChoice:
        """"<inversion>+<edit>", each part a name or alias (the reference's method keys)."""
        inv, sep, edit = name.partition("+")
        if not sep or not inv or not edit:
            raise UsageError(f"method {name!r}: expected INVERSION+EDIT, e.g. directinversion+p2p")
        for method in self.edits:  # a name that means a particular pair, e.g. stylediffusion+p2p
            for known in method.pairs:
                settings = known.match(name)
                if settings is not None:
                    choice = self.inversion(known.inversion or inv)
                    own = _split(choice.method, settings)
                    implied = Choice(choice.method, {**choice.settings, **own.settings}, {**choice.run, **own.run})
                    return PairChoice(implied, _split(method, known.edit_settings))
        return PairChoice(self.inversion(inv), self.edit(edit))

    def aliases(self) -> list[tuple[str, str, Alias]]:
        """(kind, method name, alias) for every alias, for `invedit methods`."""
        out = [("inversion", m.name, a) for m in self.inversions for a in m.aliases]
        return out + [("edit", m.name, a) for m in self.edits for a in m.aliases]

    def choose(self, pair: str | None, inversion: str | None, edit: str | None) -> PairChoice:
        """The methods named by a pair name, or by separate names (defaults: direct + p2p)."""
        if pair is not None:
            if inversion is not None or edit is not None:
                raise UsageError("give either a method pair (INVERSION+EDIT) or --inversion/--control, not both")
            return self.pair(pair)
        return PairChoice(self.inversion(inversion or "direct"), self.edit(edit or "p2p"))

    def edit_spec(self, name: str | None = None, *, source: str, target: str, inversion: str | None = None,
                  method: str | None = None, allow_idle: bool = False, **values: Any) -> EditSpec:
        """An EditSpec from names: `name` is a pair ("directinversion+p2p") or use `inversion` and
        `method`; `values` sets any setting of either method by field name, or steps/guidance/seed.
        allow_idle: run settings under which the method touches nothing (an ablation's baseline)."""
        choice = self.choose(name, inversion, method)
        inv_values, edit_values, run = split_values(choice, values)
        return EditSpec(
            source, target,
            choice.inversion.method, settings_of(choice.inversion, inv_values),
            choice.edit.method, settings_of(choice.edit, edit_values),
            **{**choice.run, **run}, allow_idle=allow_idle,
        )

    def inversion_spec(self, name: str = "direct", *, prompt: str, **values: Any) -> InversionSpec:
        """An InversionSpec from a method name; `values` sets its settings or steps/guidance/seed."""
        choice = self.inversion(name)
        run = {k: values.pop(k) for k in RUN_KEYS if k in values}
        return InversionSpec(prompt, choice.method, settings_of(choice, values), **{**choice.run, **run})


def settings_of(choice: Choice, values: Mapping[str, Any]) -> Settings:
    """The method's default settings, then what its name implies, then `values`."""
    return choice.method.settings().with_values({**choice.settings, **values})


def split_values(choice: PairChoice, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Sort setting values by owner: the inversion, the editing method, or the run."""
    inv_names = {f.name for f in setting_fields(choice.inversion.method.settings)}
    edit_names = {f.name for f in setting_fields(choice.edit.method.settings)}
    inv, edit, run = {}, {}, {}
    for key, value in values.items():
        owners = [d for d, names in ((inv, inv_names), (edit, edit_names), (run, set(RUN_KEYS))) if key in names]
        if len(owners) != 1:
            what = "is ambiguous" if owners else "is not a setting of either method"
            raise UsageError(f"{key!r} {what} ({choice.inversion.method.name} + {choice.edit.method.name})")
        owners[0][key] = value
    return inv, edit, run
