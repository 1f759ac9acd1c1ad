"""Decide what a checkpoint's UNet predicts: the noise eps, or v (Salimans & Ho 2022, §4).

The two are indistinguishable by architecture (SD-2.x 512-base predicts eps, SD-2.x 768 predicts
v, with identical tensors), so the answer comes from a statement, first one found wins:
1. `--prediction eps|v` (the user knows best; it overrides what the files say);
2. the user's `--config` JSON when it has `unet.prediction_type`;
3. the checkpoint itself: a diffusers folder's scheduler/scheduler_config.json `prediction_type`;
   a single file's safetensors metadata (Stability's model spec `modelspec.prediction_type` or
   `modelspec.architecture`, kohya's `ss_v_parameterization`), or the original LDM config saved
   beside it as `<name>.yaml` (`model.params.parameterization: "v"`; absent means eps), the
   convention web UIs use for SD-2 checkpoints;
4. the family: every SD-1.x release predicts eps. An SD-2.x checkpoint with no statement is
   refused with one line asking for `--prediction`, rather than guessed (diffusers guesses from the
   Lightning `global_step`, which its own comment calls brittle).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ldm.config import PREDICTION_TYPES, PredictionType
from ldm.errors import UsageError, WeightsError
from weights.identify import Family

# CLI spellings and the statements found in the wild -> our (diffusers') names.
SPELLINGS: dict[str, PredictionType] = {
    "eps": "epsilon",
    "epsilon": "epsilon",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
}


def parse(value: str, where: str) -> PredictionType:
    """A user-given prediction type in any accepted spelling."""
    try:
        return SPELLINGS[value]
    except KeyError:
        raise UsageError(f"{where} {value!r}: expected eps or v") from None


def from_scheduler_config(folder: Path) -> PredictionType | None:
    """A diffusers folder's scheduler/scheduler_config.json `prediction_type`, if the file exists."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: unreadable JSON ({err})") from None
    value = data.get("prediction_type", "epsilon") if isinstance(data, dict) else None  # diffusers' default
    if value not in PREDICTION_TYPES:
        raise WeightsError(f"{path}: prediction_type {value!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return value


def from_metadata(metadata: dict[str, str] | None) -> PredictionType | None:
    """What a safetensors file's `__metadata__` says, if anything."""
    metadata = metadata or {}
    spec = metadata.get("modelspec.prediction_type")
    if spec in SPELLINGS:
        return SPELLINGS[spec]
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v"):  # "-v2-768-v" is v; "-v2-512", "-v1" are eps
        return "v_prediction" if architecture.split("/")[0].endswith("-v") else "epsilon"
    kohya = metadata.get("ss_v_parameterization")
    if kohya in ("True", "False"):
        return "v_prediction" if kohya == "True" else "epsilon"
    return None


def from_ldm_yaml(checkpoint: Path) -> PredictionType | None:
    """`model.params.parameterization` of `<checkpoint stem>.yaml` beside the checkpoint, if present."""
    path = checkpoint.with_suffix(".yaml")
    if not path.is_file():
        return None
    import yaml  # pyyaml, a dependency of transformers

    try:
        data: Any = yaml.safe_load(path.read_text())
        params = data["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise WeightsError(f"{path}: not an LDM model config (expected model.params; {err})") from None
    value = params.get("parameterization", "eps") if isinstance(params, dict) else None
    if value not in ("eps", "v"):
        raise WeightsError(f"{path}: parameterization {value!r}; expected eps or v")
    return SPELLINGS[value]


def decide(statements: Iterable[PredictionType | None], family: Family, source: Path) -> PredictionType:
    """The first statement made, else the family's only choice, else one line asking for it."""
    for value in statements:
        if value is not None:
            return value
    if family == "SD-1.x":
        return "epsilon"
    raise WeightsError(
        f"{source}: cannot tell whether this {family} UNet predicts the noise or v (no scheduler config, "
        "metadata or .yaml beside it says); pass --prediction eps for 512 px base models or --prediction v "
        "for 768 px models"
    )
