"""How a method declares its settings: frozen dataclasses whose fields describe themselves.

Every inversion and editing method has one settings dataclass, subclass of `Settings`, whose
defaults are the reference code's. Each field is declared with `setting(default, help, ...)`, which
records what the command line, `--help` and the checks need: a one-line help, the flag, a metavar,
how to parse a command-line string, the allowed choices or range. The command line
(evaluation/options.py) is generated from these declarations, so a method's options live in one
place: its own module.

Settings validate themselves on construction (`Settings.__post_init__`): a value outside its
declared range or choices, or a non-finite float, raises `UsageError` naming the flag, whether the
value came from the command line or from Python.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Literal, Mapping

from ldm.errors import UsageError

Repeat = Literal["list", "dict"]


@dataclass(frozen=True)
class SettingInfo:
    """What one settings field declares besides its default.

    parse: turns one command-line string into the value (or, with `repeat`, into one item: a value
        for "list", a (key, value) pair for "dict"); None parses by the field's type.
    low, high: inclusive bounds for numbers (each item of a list or dict value is checked).
    flag: the command-line flag; None derives it from the field name ("pnp_features" ->
        "--pnp-features").
    """

    help: str
    flag: str | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    repeat: Repeat | None = None
    allow_nan: bool = False


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    repeat: Repeat | None = None,
) -> Any:
    """A dataclass field of a `Settings` class with its description (see SettingInfo)."""
    info = SettingInfo(help, flag, metavar, parse, choices, low, high, repeat)
    return field(default=default, metadata={"setting": info})


@dataclass(frozen=True)
class SettingField:
    """One declared field, with its resolved type and flag."""

    name: str
    type: Any
    default: Any
    info: SettingInfo

    @property
    def flag(self) -> str:
        return self.info.flag or "--" + self.name.rstrip("_").replace("_", "-")


@lru_cache(maxsize=None)
def setting_fields(cls: type) -> tuple[SettingField, ...]:
    """The declared fields of a Settings class, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        info = f.metadata.get("setting")
        if info is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting(...)")
        out.append(SettingField(f.name, hints[f.name], f.default, info))
    return tuple(out)


def _check_number(flag: str, value: Any, info: SettingInfo) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value) and not info.allow_nan:
        raise UsageError(f"{flag} {value}: expected a finite number")
    if info.low is not None and value < info.low:
        raise UsageError(f"{flag} {value}: expected at least {info.low:g}")
    if info.high is not None and value > info.high:
        raise UsageError(f"{flag} {value}: expected at most {info.high:g}")


def _items(value: Any) -> list[Any]:
    """The scalar values inside a setting's value (a tuple window, list items, dict values)."""
    if isinstance(value, Mapping):
        return [x for v in value.values() for x in _items(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _items(v)]
    return [value]


def check_settings(settings: "Settings") -> None:
    """Raise UsageError, naming the flag, for a value outside its declared choices or range."""
    for f in setting_fields(type(settings)):
        value = getattr(settings, f.name)
        if value is None:
            continue
        if f.info.choices is not None and value not in f.info.choices:
            choices = ", ".join(str(c) for c in f.info.choices)
            raise UsageError(f"{f.flag} {value!r}: choose from {choices}")
        for item in _items(value):
            _check_number(f.flag, item, f.info)


@dataclass(frozen=True)
class Settings:
    """Base of every method's settings: validated on construction."""

    def __post_init__(self) -> None:
        check_settings(self)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in setting_fields(type(self))}

    def with_values(self, values: Mapping[str, Any]) -> "Settings":
        """A copy with some fields replaced (validated again); unknown names are a UsageError."""
        known = {f.name for f in setting_fields(type(self))}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"{type(self).__name__} has no setting {', '.join(unknown)}")
        return dataclasses.replace(self, **values)


@dataclass(frozen=True)
class NoSettings(Settings):
    """For a method without options."""


@dataclass(frozen=True)
class Alias:
    """Another name for a method, maybe implying some of its settings.

    name: a literal name (the reference's index names, e.g. "directinversion"), or with
    `pattern=True` a regular expression matched against the whole name (the reference's
    parametrised ablation names). overrides: the setting values the alias implies; with a pattern,
    a function of the match returning them.
    """

    name: str
    overrides: Mapping[str, Any] | Callable[[re.Match[str]], Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    pattern: bool = False

    def match(self, name: str) -> dict[str, Any] | None:
        """The implied settings if `name` is this alias, else None."""
        if not self.pattern:
            return dict(self.overrides) if name == self.name else None  # type: ignore[arg-type]
        m = re.fullmatch(self.name, name)
        if m is None:
            return None
        return dict(self.overrides(m)) if callable(self.overrides) else dict(self.overrides)
