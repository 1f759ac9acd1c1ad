"""`invedit convert`: turn an SD-1.x checkpoint in any real-world layout into our directory format.

Inputs (WEIGHTS.md §2, §3): a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`,
`tokenizer/`; .safetensors or .bin, optional .fp16 variants), or a single original-layout file
(the CompVis Lightning `.ckpt`, or a `.safetensors` with the same keys). Output (DESIGN.md §8):
`unet.safetensors`, `vae.safetensors`, `text.safetensors`, `config.json` (SDConfig.to_dict()) and
`tokenizer/vocab.json` + `merges.txt`. Pickles are read without executing code (weights/safeload.py).
The result is assembled in a hidden temporary directory beside the destination and renamed into
place, so an interrupted conversion never leaves a directory that `StableDiffusion.load` accepts.
"""

from __future__ import annotations

import argparse

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ldm.config import SD14, SDConfig
from ldm.errors import UsageError, WeightsError
from ldm.model import COMPONENTS, DTYPES, build_networks
from weights import identify, layouts
from weights.safeload import check_safetensors_header, read_state_dict, sniff_format

# diffusers folder: subfolder -> weight file stems, in order of preference.
DIFFUSERS_FILES = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}


def expected_shapes(config: SDConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Parameter name -> shape of each of our networks for `config`, built on the meta device."""
    try:
        nets = build_networks(config)
    except ValueError as err:  # the networks refuse configs outside the SD-1 family
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


def read_diffusers_folder(folder: Path) -> tuple[dict[str, dict[str, Tensor]], SDConfig]:
    config = identify.config_from_diffusers(folder)
    unet, unknown_unet = layouts.unet_from_diffusers(_read_diffusers_component(folder / "unet"), config.unet)
    vae, unknown_vae = layouts.vae_from_diffusers(_read_diffusers_component(folder / "vae"), config.vae)
    text = layouts.text_from_hf(_read_diffusers_component(folder / "text_encoder"))
    for name, unknown in (("unet", unknown_unet), ("vae", unknown_vae)):
        if unknown:
            raise WeightsError(
                f"{folder / name}: {len(unknown)} weights outside the SD-1 layout (e.g. {', '.join(unknown[:3])})"
            )
    return {"unet": unet, "vae": vae, "text": text}, config


def _describe_folder(folder: Path) -> str:
    if (folder / "unet.safetensors").is_file() and (folder / "config.json").is_file():
        return f"{folder} is already a converted invedit model directory; load it directly"
    if (folder / "vae").is_dir() or (folder / "diffusion_pytorch_model.safetensors").is_file():
        return f"{folder}: this is a VAE-only or single-component folder; expected {identify.EXPECTED}"
    return f"{folder}: not a diffusers Stable Diffusion folder (no unet/ subfolder); expected {identify.EXPECTED}"


# --- single original-layout file ----------------------------------------------------------------


def read_single_file(path: Path, config: SDConfig, ema: bool | None) -> dict[str, dict[str, Tensor]]:
    """The components of an original-layout file, the UNet from its EMA copy when chosen."""
    state: dict[str, Tensor] | None = None
    if sniff_format(path) == "safetensors":  # identify from the header before reading gigabytes
        shapes = {k: v["shape"] for k, v in check_safetensors_header(path).items()}
    else:  # a zip pickle is memory-mapped: listing its shapes reads no tensor data
        state = read_state_dict(path)
        shapes = {k: list(v.shape) for k, v in state.items()}
    identify.identify_single_file(path, shapes)

    n_ema = sum(k.startswith(layouts.EMA_PREFIX) for k in shapes)
    has_ema = n_ema > layouts.MIN_EMA_KEYS
    if ema and not has_ema:
        raise WeightsError(f"{path}: --ema was asked for but the file has no EMA weights ({n_ema} model_ema. keys)")
    use_ema = has_ema if ema is None else bool(ema)
    unet_prefix = layouts.EMA_PREFIX if use_ema else layouts.UNET_PREFIX
    wanted = (unet_prefix, layouts.VAE_PREFIX, layouts.TEXT_PREFIX)
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
    text = layouts.text_from_hf(layouts.strip_prefix(state, layouts.TEXT_PREFIX))
    return {"unet": unet, "vae": vae, "text": text}


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
            for fname in ("vocab.json", "merges.txt"):
                shutil.copyfile(tokenizer_dir / fname, tmp / "tokenizer" / fname)
        else:
            write_bundled_tokenizer(tmp / "tokenizer")
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


def _load_config(config: SDConfig | str | os.PathLike[str] | Mapping | None) -> SDConfig | None:
    if config is None or isinstance(config, SDConfig):
        return config
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
    try:
        return SDConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--config {where}: not an invedit SDConfig ({err})") from None


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    ema: bool | None = None,
    config: SDConfig | str | os.PathLike[str] | Mapping | None = None,
) -> Path:
    """Convert `src` (diffusers folder or original-layout file) into our directory `dst`.

    dtype: "fp16" | "bf16" | "fp32" | a torch dtype | None (keep the source's). ema: None takes the
    UNet from the EMA copy when the file has one, True requires it, False never uses it.
    config: our SDConfig (object, dict or JSON path) for single files that are not SD-1.4-shaped;
    a diffusers folder carries its own. A folder without tokenizer files gets the bundled CLIP
    tokenizer, as single files do (every SD-1.x uses CLIP ViT-L/14's).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise WeightsError(f"checkpoint {src} does not exist")
    _check_destination(dst)
    sd_config = _load_config(config)
    if src.is_dir():
        if not (src / "unet").is_dir():
            raise WeightsError(_describe_folder(src))
        if sd_config is not None:
            raise UsageError(f"{src} is a diffusers folder, which carries its own configs; drop --config")
        if ema:
            raise WeightsError(f"{src}: --ema was asked for but diffusers folders hold no EMA weights")
        components, sd_config = read_diffusers_folder(src)
        tok = src / "tokenizer"
        tokenizer_dir = tok if all((tok / f).is_file() for f in ("vocab.json", "merges.txt")) else None
        hint = ""
    else:
        hint = "" if sd_config is not None else " (pass --config CONFIG.json for a checkpoint not shaped like SD-1.4)"
        sd_config = sd_config or SD14
        components = read_single_file(src, sd_config, ema)
        tokenizer_dir = None
    check_against_config(components, sd_config, src, hint)
    _write(dst, components, sd_config, _target_dtype(components, dtype), tokenizer_dir)
    return dst


def add_arguments(parser: argparse.ArgumentParser, registry: object = None) -> None:
    """`invedit convert` options (`registry` is unused: conversion knows no methods)."""
    parser.description = ("Convert an SD-1.x checkpoint (original .ckpt/.safetensors or a diffusers folder) "
                          "into an invedit model directory.")
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
    parser.add_argument("--config", help="our config.json for a single-file checkpoint that is not SD-1.4-shaped")


def run(args: argparse.Namespace, registry: object = None) -> int:
    out = convert(args.src, args.dst, dtype=args.dtype, ema=args.ema, config=args.config)
    print(f"wrote {out}")
    return 0
