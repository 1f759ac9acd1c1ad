"""Command-line options generated from the registry, and the options every run command shares.

Each method's settings dataclass declares its fields with `setting()` (samplers/settings.py); this
module turns those declarations into argparse options (one group per method, with each option's
help, default and choices in `--help`) and the parsed strings back into validated settings. An
option of a method that the command line did not select is an error, not silently ignored.

Method options are added with `default=argparse.SUPPRESS`, so `args` holds exactly the options
the user typed; defaults come from the settings dataclass, then from the method's alias, then
what was typed.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Sequence

import torch

from evaluation.images import DEFAULT_MAX_PIXELS
from evaluation.registry import Choice, Registry, settings_of
from ldm.errors import UsageError
from ldm.model import DTYPES
from samplers.settings import SettingField, Settings, setting_fields

DEST_PREFIX = "setting:"


def _dest(method_name: str, f: SettingField) -> str:
    return f"{DEST_PREFIX}{method_name}:{f.name}"


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return ":".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "none" if value is None else str(value)


def add_method_options(parser: argparse.ArgumentParser, methods: Sequence[Any], kind: str) -> None:
    """One argument group per method with each declared setting as an option."""
    for method in methods:
        fields = setting_fields(method.settings)
        if not fields:
            continue
        group = parser.add_argument_group(f"{kind} {method.name}", method.summary)
        for f in fields:
            info = f.info
            text = f"{info.help} (default: {_describe(f.default)})"
            if info.choices:
                text += f"; one of {', '.join(str(c) for c in info.choices)}"
            kwargs: dict[str, Any] = {"dest": _dest(method.name, f), "default": argparse.SUPPRESS, "help": text}
            if _base_type(f.type) is bool:
                group.add_argument(f.flag, action="store_const", const="true", **kwargs)
                continue
            kwargs["metavar"] = info.metavar or f.name.rstrip("_").upper()
            if info.repeat:
                kwargs["action"] = "append"
            group.add_argument(f.flag, **kwargs)


def _base_type(tp: Any) -> Any:
    """X for X | None (Optional settings parse as their inner type)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_one(f: SettingField, text: str) -> Any:
    if f.info.parse is not None:
        return f.info.parse(text)
    tp = _base_type(f.type)
    if tp is bool:
        return True
    if tp in (int, float, str):
        return tp(text)
    raise TypeError(f"setting {f.name} of type {f.type} needs a parse function")


def parse_value(f: SettingField, raw: Any) -> Any:
    """A typed value from the option's string(s); a parse failure is a UsageError naming the flag."""
    items = raw if isinstance(raw, list) else [raw]
    parsed = []
    for text in items:
        try:
            parsed.append(_parse_one(f, text))
        except (ValueError, TypeError) as err:
            raise UsageError(f"{f.flag} {text!r}: {err}") from None
    if f.info.repeat == "dict":
        return dict(parsed)
    if f.info.repeat == "list":
        return parsed
    return parsed[0]


def typed_values(args: argparse.Namespace, method: Any) -> dict[str, Any]:
    """The settings of `method` the user typed, parsed."""
    given = vars(args)
    return {f.name: parse_value(f, given[_dest(method.name, f)]) for f in setting_fields(method.settings)
            if _dest(method.name, f) in given}


def refuse_foreign_options(args: argparse.Namespace, registry: Registry, chosen: Sequence[str]) -> None:
    """An option of a method that was not chosen is an error naming both."""
    owner = {_dest(m.name, f): (m.name, f.flag) for m in (*registry.inversions, *registry.edits)
             for f in setting_fields(m.settings)}
    for dest in vars(args):
        if dest in owner and owner[dest][0] not in chosen:
            name, flag = owner[dest]
            raise UsageError(f"{flag} is an option of {name}, which this command line does not use "
                             f"(methods: {', '.join(chosen)})")


def build_settings(args: argparse.Namespace, choice: Choice) -> Settings:
    """Defaults, then what the method's name implies, then what was typed."""
    return settings_of(choice, typed_values(args, choice.method))


def add_run_options(p: argparse.ArgumentParser, *, output: str = "output directory") -> None:
    """The options of every command that runs the model."""
    group = p.add_argument_group("run")
    group.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50, or the inversion file's)")
    group.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    group.add_argument("--size", default="512",
                       help="image size N or WIDTHxHEIGHT in pixels, multiples of 64; the photo is center-cropped "
                            "to its aspect ratio and resized (default: 512)")
    group.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help="refuse input images with more pixels than this, e.g. decompression bombs "
                            f"(default: {DEFAULT_MAX_PIXELS}, PIL's limit)")
    group.add_argument("--ignore-orientation", action="store_true",
                       help="read the photo's pixels as stored, ignoring its EXIF orientation tag (the reference's "
                            "behaviour; by default a photo taken sideways is turned upright)")
    group.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                       help="model dtype (default: bf16 on a CPU with AMX or AVX-512 bf16 units, else the dtype the "
                            "weights are stored in; the DDIM arithmetic is float32 either way)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default: cuda when available, else cpu)")
    group.add_argument("--seed", type=int, default=1234,
                       help="seed of the stochastic methods' draws (default: 1234, the reference's)")
    group.add_argument("-o", "--output", required=True, help=output)
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
