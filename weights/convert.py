"""`invedit convert`: turn an SD-1.x / SD-2.x checkpoint in any real-world layout into our directory.

Inputs: a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`; .safetensors or .bin, optional .fp16 variants), or a single
original-layout file (the CompVis / Stability Lightning `.ckpt`, or a `.safetensors` with the same
keys; SD-2's text encoder in OpenCLIP's layout). Output (what ldm/model.py loads): `unet.safetensors`,
`vae.safetensors`, `text.safetensors`, `config.json` (SDConfig.to_dict(), including the prediction
type decided by weights/prediction.py and the padding token) and `tokenizer/`: a diffusers folder's
own tokenizer files, copied as they are (any format transformers writes; a folder without them is
refused, never given the bundled vocabulary), or for single files the bundled CLIP vocabulary with
the family's padding. The padding token is the one the tokenizer files name, else the family's
(SD-1: EOS, SD-2: "!"). Pickles are read without executing code (weights/safeload.py).
The result is assembled in a hidden temporary directory beside the destination and renamed into
place, so an interrupted conversion never leaves a directory that `StableDiffusion.load` accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm.config import SD14, SD21_BASE, SD21_V, PredictionType, SDConfig
from ldm.errors import UsageError, WeightsError
from ldm.model import COMPONENTS, DTYPES, build_networks
from ldm.tokenizer import Tokenizer, declared_pad_token, has_tokenizer_files
from weights import identify, layouts, prediction
from weights.identify import Family
from weights.safeload import check_safetensors_header, read_state_dict, sniff_format

# diffusers folder: subfolder -> weight file stems, in order of preference.
DIFFUSERS_FILES = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}
# The files transformers reads a tokenizer from, in any version's save format.
TOKENIZER_FILES = (
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)  # fmt: skip
# Each family's released architecture and padding; the 768-v SD-2 models are SD21_V.
FAMILY_PRESETS: dict[Family, SDConfig] = {"SD-1.x": SD14, "SD-2.x": SD21_BASE}


def with_settings(config: SDConfig, prediction_type: PredictionType, pad_token: str) -> SDConfig:
    """`config` with the decided prediction type and padding token."""
    unet = dataclasses.replace(config.unet, prediction_type=prediction_type)
    return dataclasses.replace(config, unet=unet, text=dataclasses.replace(config.text, pad_token=pad_token))


def family_preset(family: Family, prediction_type: PredictionType) -> SDConfig:
    """The config of a single file converted without --config."""
    if family == "SD-2.x" and prediction_type == "v_prediction":
        return SD21_V  # float32 attention, as 2.1-768-v needs (2.0-768-v is unharmed by it)
    base = FAMILY_PRESETS[family]
    return with_settings(base, prediction_type, base.text.pad_token)


def expected_shapes(config: SDConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Parameter name -> shape of each of our networks for `config`, built on the meta device."""
    try:
        nets = build_networks(config)
    except ValueError as err:  # the networks refuse configs they cannot build
        raise WeightsError(f"unsupported model config: {err}") from None
    return {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in nets.items()}


def check_against_config(
    components: Mapping[str, Mapping[str, Tensor]], config: SDConfig, source: Path, hint: str = ""
) -> None:
    """Exact key set and shapes per component; one line naming the first problems."""
    expected = expected_shapes(config)
    for name in COMPONENTS:
        got, want = components[name], expected[name]
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = [k for k in want if k in got and tuple(got[k].shape) != want[k]]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if extra:
            problems.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
        if wrong:
            k = wrong[0]
            problems.append(
                f"{len(wrong)} with the wrong shape (e.g. {k}: {list(got[k].shape)}, expected {list(want[k])})"
            )
        if problems:
            raise WeightsError(f"{source}: {name} weights do not match the config: {'; '.join(problems)}{hint}")
        bad = [k for k in want if not got[k].is_floating_point()]
        if bad:
            raise WeightsError(f"{source}: {name} tensor {bad[0]} is {got[bad[0]].dtype}, expected a float type")


# --- diffusers folder ---------------------------------------------------------------------------


def _diffusers_weight_file(sub: Path, stems: tuple[str, ...]) -> list[Path]:
    for variant in ("", ".fp16"):
        for stem in stems:
            for ext in (".safetensors", ".bin"):
                path = sub / f"{stem}{variant}{ext}"
                if path.is_file():
                    return [path]
                index = sub / f"{stem}{variant}{ext}.index.json"
                if index.is_file():  # sharded weights
                    try:
                        weight_map = json.loads(index.read_text())["weight_map"]
                    except (ValueError, KeyError, OSError) as err:
                        raise WeightsError(f"{index}: unreadable shard index ({err})") from None
                    return [sub / name for name in dict.fromkeys(weight_map.values())]
    raise WeightsError(f"{sub}: no weights file found (expected {stems[0]}.safetensors or .bin)")


def _read_diffusers_component(sub: Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in _diffusers_weight_file(sub, DIFFUSERS_FILES[sub.name]):
        state.update(read_state_dict(path))
    return state


def read_diffusers_folder(
    folder: Path, given: PredictionType | None
) -> tuple[dict[str, dict[str, Tensor]], SDConfig, Path]:
    """The components, the config and the tokenizer folder of a diffusers pipeline folder."""
    config = identify.config_from_diffusers(folder)
    family = identify.family_of_text_encoder(config.text.hidden_act)
    tokenizer_dir = folder / "tokenizer"
    if not has_tokenizer_files(tokenizer_dir):
        raise WeightsError(
            f"{tokenizer_dir}: no tokenizer files (expected tokenizer.json, or vocab.json + merges.txt); "
            "the folder's own tokenizer is needed for its padding and any added tokens"
        )
    pad = declared_pad_token(tokenizer_dir) or FAMILY_PRESETS[family].text.pad_token
    config = with_settings(
        config, prediction.decide([given, prediction.from_scheduler_config(folder)], family, folder), pad
    )
    unet, unknown_unet = layouts.unet_from_diffusers(_read_diffusers_component(folder / "unet"), config.unet)
    vae, unknown_vae = layouts.vae_from_diffusers(_read_diffusers_component(folder / "vae"), config.vae)
    text = layouts.text_from_hf(_read_diffusers_component(folder / "text_encoder"))
    for name, unknown in (("unet", unknown_unet), ("vae", unknown_vae)):
        if unknown:
            raise WeightsError(
                f"{folder / name}: {len(unknown)} weights outside the {family} layout (e.g. {', '.join(unknown[:3])})"
            )
    return {"unet": unet, "vae": vae, "text": text}, config, tokenizer_dir


def _describe_folder(folder: Path) -> str:
    if (folder / "unet.safetensors").is_file() and (folder / "config.json").is_file():
        return f"{folder} is already a converted invedit model directory; load it directly"
    if (folder / "vae").is_dir() or (folder / "diffusion_pytorch_model.safetensors").is_file():
        return f"{folder}: this is a VAE-only or single-component folder; expected {identify.EXPECTED}"
    return f"{folder}: not a diffusers Stable Diffusion folder (no unet/ subfolder); expected {identify.EXPECTED}"


# --- single original-layout file ----------------------------------------------------------------


@dataclass(frozen=True)
class UserConfig:
    """--config as given: the architecture, and the two settings only when the JSON states them
    (a missing one is decided from the checkpoint, not taken from SD-1.4's defaults)."""

    config: SDConfig | None = None
    prediction_type: PredictionType | None = None
    pad_token: str | None = None


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata()
    except Exception as err:  # any parse failure means a corrupt file
        raise WeightsError(f"{path}: cannot read safetensors metadata ({err})") from None


def read_single_file(
    path: Path, user: UserConfig, ema: bool | None, given: PredictionType | None
) -> tuple[dict[str, dict[str, Tensor]], SDConfig]:
    """The components of an original-layout file, the UNet from its EMA copy when chosen, and the
    config: the user's (--config) or the family's, with the decided prediction type."""
    state: dict[str, Tensor] | None = None
    metadata: dict[str, str] | None = None
    if sniff_format(path) == "safetensors":  # identify from the header before reading gigabytes
        shapes = {k: v["shape"] for k, v in check_safetensors_header(path).items()}
        metadata = _safetensors_metadata(path)
    else:  # a zip pickle is memory-mapped: listing its shapes reads no tensor data
        state = read_state_dict(path)
        shapes = {k: list(v.shape) for k, v in state.items()}
    family = identify.identify_single_file(path, shapes)
    statements = [given, user.prediction_type, prediction.from_metadata(metadata), prediction.from_ldm_yaml(path)]
    prediction_type = prediction.decide(statements, family, path)
    if user.config is None:
        config = family_preset(family, prediction_type)
    else:
        config = with_settings(user.config, prediction_type, user.pad_token or FAMILY_PRESETS[family].text.pad_token)

    n_ema = sum(k.startswith(layouts.EMA_PREFIX) for k in shapes)
    has_ema = n_ema > layouts.MIN_EMA_KEYS
    if ema and not has_ema:
        raise WeightsError(f"{path}: --ema was asked for but the file has no EMA weights ({n_ema} model_ema. keys)")
    use_ema = has_ema if ema is None else bool(ema)
    unet_prefix = layouts.EMA_PREFIX if use_ema else layouts.UNET_PREFIX
    text_prefix = layouts.OPEN_CLIP_PREFIX if family == "SD-2.x" else layouts.TEXT_PREFIX
    wanted = (unet_prefix, layouts.VAE_PREFIX, text_prefix)
    if state is None:
        state = read_state_dict(path, keep=lambda k: k.startswith(wanted))
    if use_ema:
        unet_names = expected_shapes(config)["unet"]
        unet = {k: state[layouts.ema_key(k)] for k in unet_names if layouts.ema_key(k) in state}
    else:
        unet = layouts.strip_prefix(state, layouts.UNET_PREFIX)
        if not unet:
            raise WeightsError(f"{path}: no non-EMA UNet weights (model.diffusion_model.*); use --ema")
    vae = layouts.vae_attention_to_conv(layouts.strip_prefix(state, layouts.VAE_PREFIX))
    if family == "SD-2.x":
        text, unknown = layouts.text_from_open_clip(layouts.strip_prefix(state, text_prefix), config.text.num_layers)
        if unknown:
            raise WeightsError(
                f"{path}: {len(unknown)} OpenCLIP text weights outside the SD-2 layout for a "
                f"{config.text.num_layers}-layer config (e.g. {', '.join(unknown[:3])})"
            )
    else:
        text = layouts.text_from_hf(layouts.strip_prefix(state, text_prefix))
    return {"unet": unet, "vae": vae, "text": text}, config


# --- output -------------------------------------------------------------------------------------


def _target_dtype(components: Mapping[str, Mapping[str, Tensor]], dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    # Keep the source's precision: the dtype most of the UNet is stored in.
    counts = Counter(t.dtype for t in components["unet"].values() if t.is_floating_point())
    return counts.most_common(1)[0][0]


def _prepare(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.to(dtype).contiguous()
    # safetensors refuses tensors that share storage (views into a pickle's common buffer).
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _check_destination(dst: Path) -> None:
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise UsageError(f"destination {dst} already exists; remove it or choose a new directory")
    parent = dst.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"destination {dst} cannot be created: {parent} is not a writable directory")


def _write(
    dst: Path,
    components: Mapping[str, Mapping[str, Tensor]],
    config: SDConfig,
    dtype: torch.dtype,
    tokenizer_dir: Path | None,
) -> None:
    from safetensors.torch import save_file

    from ldm.files import write_json
    from ldm.tokenizer import write_bundled_tokenizer

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    except OSError as err:
        raise UsageError(f"destination {dst} cannot be created ({err.strerror})") from None
    try:
        for name in COMPONENTS:
            tensors = {k: _prepare(v, dtype) for k, v in sorted(components[name].items())}
            save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
            del tensors
        (tmp / "tokenizer").mkdir()
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                if (tokenizer_dir / fname).is_file():
                    shutil.copyfile(tokenizer_dir / fname, tmp / "tokenizer" / fname)
        else:
            write_bundled_tokenizer(tmp / "tokenizer", config.text.pad_token)
        write_json(tmp / "config.json", config.to_dict())
        # mkdtemp makes a private directory; a model directory is meant to be shared read-only.
        for path in tmp.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(tmp, 0o755)
        if dst.is_dir():  # an empty directory the user created: replace it
            dst.rmdir()
        os.rename(tmp, dst)
    except OSError as err:  # disk full, permissions, a destination that appeared meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"writing {dst} failed: {err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_config(config: SDConfig | str | os.PathLike[str] | Mapping | None) -> UserConfig:
    if config is None:
        return UserConfig()
    if isinstance(config, SDConfig):
        return UserConfig(config, config.unet.prediction_type, config.text.pad_token)
    if isinstance(config, Mapping):
        data, where = dict(config), "config"
    else:
        where = str(config)
        try:
            data = json.loads(Path(config).read_text())
        except FileNotFoundError:
            raise UsageError(f"--config {where} does not exist") from None
        except (OSError, ValueError) as err:
            raise UsageError(f"--config {where}: unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {where}: expected a JSON object")
    try:
        parsed = SDConfig.from_dict(data)
    except (ValueError, TypeError, AttributeError) as err:
        raise UsageError(f"--config {where}: not an invedit SDConfig ({err})") from None
    unet, text = data.get("unet", {}), data.get("text", {})
    return UserConfig(parsed, unet.get("prediction_type"), text.get("pad_token"))


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    ema: bool | None = None,
    config: SDConfig | str | os.PathLike[str] | Mapping | None = None,
    prediction_type: str | None = None,
) -> Path:
    """Convert `src` (diffusers folder or original-layout file) into our directory `dst`.

    dtype: "fp16" | "bf16" | "fp32" | a torch dtype | None (keep the source's). ema: None takes the
    UNet from the EMA copy when the file has one, True requires it, False never uses it.
    config: our SDConfig (object, dict or JSON path) for single files not shaped like SD-1.4 or
    SD-2.x; a diffusers folder carries its own. prediction_type: "eps" | "v" (or diffusers'
    "epsilon" | "v_prediction"), overriding what the checkpoint says (weights/prediction.py).
    """
    src, dst = Path(src), Path(dst)
    given = None if prediction_type is None else prediction.parse(prediction_type, "--prediction")
    if not src.exists():
        raise WeightsError(f"checkpoint {src} does not exist")
    _check_destination(dst)
    user = _load_config(config)
    if src.is_dir():
        if not (src / "unet").is_dir():
            raise WeightsError(_describe_folder(src))
        if user.config is not None:
            raise UsageError(f"{src} is a diffusers folder, which carries its own configs; drop --config")
        if ema:
            raise WeightsError(f"{src}: --ema was asked for but diffusers folders hold no EMA weights")
        components, sd_config, tokenizer_dir = read_diffusers_folder(src, given)
        tokenizer = Tokenizer.from_dir(tokenizer_dir, sd_config.text.pad_token)
        hint = ""
    else:
        hint = " (pass --config CONFIG.json for a checkpoint not shaped like SD-1.4 or SD-2.x)"
        hint = "" if user.config is not None else hint
        components, sd_config = read_single_file(src, user, ema, given)
        tokenizer, tokenizer_dir = Tokenizer.bundled(sd_config.text.pad_token), None
    check_against_config(components, sd_config, src, hint)
    tokenizer.check_fits(sd_config.text.vocab_size, str(tokenizer_dir or src))
    _write(dst, components, sd_config, _target_dtype(components, dtype), tokenizer_dir)
    return dst


def add_arguments(parser: argparse.ArgumentParser, registry: object = None) -> None:
    """`invedit convert` options (`registry` is unused: conversion knows no methods)."""
    parser.description = ("Convert an SD-1.x or SD-2.x checkpoint (original .ckpt/.safetensors or a diffusers "
                          "folder) into an invedit model directory.")
    parser.add_argument("src", help="sd-v1-4.ckpt, a same-layout .safetensors, or a diffusers folder")
    parser.add_argument("dst", help="new directory to write (must not exist, or be empty)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="store weights in this precision (default: as the source)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ema", dest="ema", action="store_true", default=None,
                       help="take the UNet from the EMA copy, and fail if the checkpoint has none "
                            "(default: the EMA copy when present)")
    group.add_argument("--no-ema", dest="ema", action="store_false", help="never use the EMA copy")
    parser.add_argument(
        "--config", help="our config.json for a single-file checkpoint not shaped like SD-1.4 or SD-2.x"
    )
    parser.add_argument(
        "--prediction",
        choices=("eps", "v"),
        help="what the UNet predicts: the noise (eps: SD-1.x, SD-2.x 512 px base) or v (SD-2.x 768 px); "
        "needed for SD-2.x files whose scheduler config, metadata or .yaml does not say",
    )


def run(args: argparse.Namespace, registry: object = None) -> int:
    out = convert(
        args.src, args.dst, dtype=args.dtype, ema=args.ema, config=args.config, prediction_type=args.prediction
    )
    print(f"wrote {out}")
    return 0
