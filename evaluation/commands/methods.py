"""`invedit methods`: every registered inversion and editing method, its names and its options."""

from __future__ import annotations

import argparse

from evaluation.registry import Registry
from samplers.settings import setting_fields

DESCRIPTION = "List every inversion and editing method, the reference's names for them, and their options."


def add_arguments(p: argparse.ArgumentParser, registry: Registry) -> None:
    p.description = DESCRIPTION


def describe(method, kind: str) -> list[str]:  # InversionMethod | EditMethod
    lines = [f"  {method.name}: {method.summary}"]
    names = [a.name + (f" ({', '.join(f'{k}={v}' for k, v in a.overrides.items())})" if not a.pattern and a.overrides else "")
             for a in method.aliases]
    if names:
        lines.append(f"      also: {', '.join(names)}")
    if kind == "inversion" and method.edits is not None:
        lines.append(f"      with editing methods: {', '.join(method.edits)}")
    if kind == "edit" and method.inversions is not None:
        lines.append(f"      with inversions: {', '.join(method.inversions)}")
    if kind == "edit" and method.pairs:
        for pair in method.pairs:
            inversion = f" with --inversion {pair.inversion}" if pair.inversion else ""
            if pair.pattern:  # the settings are a function of the match
                lines.append(f"      names matching {pair.name} mean this method{inversion}")
                continue
            implied = "".join(f", {k}={v}" for k, v in pair.settings.items())
            lines.append(f"      {pair.name} means this method{inversion}{implied}")
    for f in setting_fields(method.settings):
        lines.append(f"      {f.flag:<28} {f.info.help} (default: {f.default})")
    return lines


def run(args: argparse.Namespace, registry: Registry) -> int:
    lines = ["Inversion methods (--inversion NAME):"]
    for m in registry.inversions:
        lines += describe(m, "inversion")
    lines += ["", "Editing methods (--control NAME):"]
    for m in registry.edits:
        lines += describe(m, "edit")
    lines += ["", "A pair INVERSION+EDIT names both (--method, and the benchmark runner), e.g. directinversion+p2p,",
              "ddim+masactrl, null-text-inversion+proximal-guidance, directinversion+pnp."]
    print("\n".join(lines))
    return 0
