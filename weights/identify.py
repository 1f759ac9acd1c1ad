"""Recognise what a checkpoint is, and read its config out of a diffusers folder.

Two families are converted, told apart by their text tower: SD-1.x (OpenAI CLIP ViT-L/14, keys
`cond_stage_model.transformer.`, quick-GELU) and SD-2.x (OpenCLIP ViT-H/14, keys
`cond_stage_model.model.`, GELU). Anything else (SDXL, SD-1/SD-2 inpainting, SD-2 depth-to-image,
the x4 upscaler, unCLIP, a VAE-only or LoRA file, ...) is refused with one line saying what was
found and what was expected. diffusers' `attention_head_dim` is the head
*count* in SD-1/SD-2 configs, a known misnomer; `num_attention_heads` takes precedence when set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ldm.config import SDConfig, TextConfig, UNetConfig, VAEConfig
from ldm.errors import WeightsError
from weights.layouts import EMA_PREFIX, OPEN_CLIP_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

EXPECTED = (
    "an SD-1.x or SD-2.x text-to-image checkpoint "
    "(UNet with 4 input channels + VAE + CLIP ViT-L/14 or OpenCLIP ViT-H/14 text encoder)"
)
Family = Literal["SD-1.x", "SD-2.x"]
# Input channels of the UNets built on these families for other tasks.
OTHER_TASKS = {9: "inpainting (9 input channels)", 5: "depth-to-image (5 input channels)",
               7: "the x4 upscaler (7 input channels)"}  # fmt: skip


def family_of_text_encoder(hidden_act: str) -> Family:
    """OpenAI CLIP uses quick-GELU, OpenCLIP the exact GELU: the one config field that tells the
    towers apart in a diffusers folder (their widths vary with the tiny test pipelines)."""
    return "SD-2.x" if hidden_act == "gelu" else "SD-1.x"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing") from None
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return data


def _per_level(value: Any, n: int, name: str, path: Path) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, Sequence) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise WeightsError(f"{path}: {name}={value!r}: expected an int or one int per level ({n})")


def _refuse_if(cond: bool, path: Path, found: str) -> None:
    if cond:
        raise WeightsError(f"{path}: this is {found}; expected {EXPECTED}")


def unet_config_from_diffusers(path: Path) -> UNetConfig:
    c = _read_json(path)
    _refuse_if(c.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel", path,
               f"a {c.get('_class_name')} model, not a UNet2DConditionModel")  # fmt: skip
    _refuse_if(c.get("addition_embed_type") is not None, path,
               f"an SDXL-style UNet (addition_embed_type={c.get('addition_embed_type')!r})")  # fmt: skip
    in_ch = c.get("in_channels", 4)
    _refuse_if(in_ch in OTHER_TASKS, path, f"a UNet for another task: {OTHER_TASKS.get(in_ch)}")
    _refuse_if(in_ch != 4, path, f"a UNet with {in_ch} input channels")
    ctx = c.get("cross_attention_dim", 1280)
    _refuse_if(ctx == 2048, path, "an SDXL UNet (2048-wide cross-attention)")
    _refuse_if(not isinstance(ctx, int), path, f"a UNet with cross_attention_dim={ctx!r}")
    down = list(c.get("down_block_types", []))
    up = list(c.get("up_block_types", []))
    allowed_down = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    allowed_up = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    _refuse_if(not down or any(d not in allowed_down for d in down), path, f"a UNet with down blocks {down}")
    levels = tuple(allowed_down[d] for d in down)
    _refuse_if(any(u not in allowed_up for u in up) or tuple(allowed_up[u] for u in up) != levels[::-1], path,
               f"a UNet whose up blocks {up} do not mirror its down blocks {down}")  # fmt: skip
    defaults_required = {
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
        "dual_cross_attention": False,
        "only_cross_attention": False,
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "class_embed_type": None,
        "num_class_embeds": None,
        "encoder_hid_dim": None,
        "time_cond_proj_dim": None,
        "time_embedding_dim": None,
        "projection_class_embeddings_input_dim": None,
        "addition_time_embed_dim": None,
        "encoder_hid_dim_type": None,
        "timestep_post_act": None,
        "cross_attention_norm": None,
        "class_embeddings_concat": False,
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "attention_type": "default",
        "reverse_transformer_layers_per_block": None,
    }
    for key, want in defaults_required.items():
        got = c.get(key, want)
        if key == "only_cross_attention" and isinstance(got, list):
            got = any(got)
        _refuse_if(got != want, path, f"a UNet outside the SD-1/SD-2 family ({key}={got!r}, they have {want!r})")
    n = len(down)
    block_out = c.get("block_out_channels", [])
    if not (isinstance(block_out, list) and len(block_out) == n):
        raise WeightsError(f"{path}: block_out_channels={block_out!r}: expected one width per level ({n})")
    heads_src = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    depth = c.get("transformer_layers_per_block", 1)
    if isinstance(depth, list):
        _refuse_if(len(set(depth)) != 1, path, f"a UNet with per-level transformer depths {depth}")
        depth = depth[0]
    try:
        return UNetConfig(
            in_channels=in_ch,
            out_channels=c.get("out_channels", 4),
            block_out_channels=tuple(block_out),
            attention_levels=levels,
            num_heads=_per_level(heads_src, n, "attention_head_dim", path),
            layers_per_block=c.get("layers_per_block", 2),
            context_dim=ctx,
            transformer_depth=depth,
            norm_groups=c.get("norm_num_groups", 32),
            resnet_eps=c.get("norm_eps", 1e-5),
            use_linear_projection=bool(c.get("use_linear_projection", False)),
            upcast_attention=bool(c.get("upcast_attention", False)),
        )
    except ValueError as err:
        raise WeightsError(f"{path}: inconsistent UNet config ({err})") from None


def vae_config_from_diffusers(path: Path) -> VAEConfig:
    c = _read_json(path)
    _refuse_if(c.get("_class_name", "AutoencoderKL") != "AutoencoderKL", path,
               f"a {c.get('_class_name')} VAE, not an AutoencoderKL")  # fmt: skip
    down, up = c.get("down_block_types", []), c.get("up_block_types", [])
    n = len(c.get("block_out_channels", []))
    _refuse_if(any(d != "DownEncoderBlock2D" for d in down) or any(u != "UpDecoderBlock2D" for u in up)
               or len(down) != n or len(up) != n, path, f"a VAE with blocks {down} / {up}")  # fmt: skip
    for key, want in (("act_fn", "silu"), ("mid_block_add_attention", True), ("use_quant_conv", True),
                      ("use_post_quant_conv", True)):  # fmt: skip
        _refuse_if(c.get(key, want) != want, path, f"a VAE outside the SD-1/SD-2 family ({key}={c.get(key)!r})")
    return VAEConfig(
        in_channels=c.get("in_channels", 3),
        out_channels=c.get("out_channels", 3),
        block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=c.get("layers_per_block", 1),
        latent_channels=c.get("latent_channels", 4),
        norm_groups=c.get("norm_num_groups", 32),
        scale_factor=float(c.get("scaling_factor") or 0.18215),
    )


def text_config_from_hf(path: Path) -> TextConfig:
    c = _read_json(path)
    arch = c.get("architectures") or ["CLIPTextModel"]
    _refuse_if(c.get("model_type", "clip_text_model") != "clip_text_model" or arch[0] != "CLIPTextModel", path,
               f"a {c.get('model_type')} / {arch[0]} text encoder, not a CLIPTextModel")  # fmt: skip
    try:
        return TextConfig(
            vocab_size=c.get("vocab_size", 49408),
            hidden_size=c.get("hidden_size", 512),
            intermediate_size=c.get("intermediate_size", 2048),
            num_layers=c.get("num_hidden_layers", 12),
            num_heads=c.get("num_attention_heads", 8),
            max_positions=c.get("max_position_embeddings", 77),
            layer_norm_eps=c.get("layer_norm_eps", 1e-5),
            hidden_act=c.get("hidden_act", "quick_gelu"),
        )
    except ValueError as err:  # an activation neither CLIP tower uses, heads that do not divide
        raise WeightsError(f"{path}: not a CLIP or OpenCLIP text encoder ({err})") from None


def config_from_diffusers(folder: Path) -> SDConfig:
    """The SDConfig of a diffusers SD-1.x / SD-2.x pipeline folder, from its three config.json
    files (the prediction type and the padding token are decided by the caller)."""
    unet = unet_config_from_diffusers(folder / "unet" / "config.json")
    vae = vae_config_from_diffusers(folder / "vae" / "config.json")
    text = text_config_from_hf(folder / "text_encoder" / "config.json")
    if text.hidden_size != unet.context_dim:
        raise WeightsError(
            f"{folder}: text encoder width {text.hidden_size} does not match the UNet cross-attention "
            f"width {unet.context_dim}"
        )
    return SDConfig(unet=unet, vae=vae, text=text)


def identify_single_file(path: Path, shapes: Mapping[str, Sequence[int]]) -> Family:
    """The family of an original-layout SD-1.x / SD-2.x file, refusing anything else; `shapes`
    maps every key to its shape."""
    keys = list(shapes)

    def has(prefix: str) -> int:
        return sum(k.startswith(prefix) for k in keys)

    def refuse(found: str) -> None:
        raise WeightsError(f"{path}: this is {found}; expected {EXPECTED}")

    if not keys:
        refuse("a file without tensors")
    if has("conditioner.embedders."):
        refuse("an SDXL checkpoint (conditioner.embedders. text encoders)")
    if any("lora" in k.lower() for k in keys):  # kohya lora_unet_*, PEFT lora_A/B, diffusers *_lora.*
        refuse("a LoRA adapter, not a full checkpoint")
    unet_keys = has(UNET_PREFIX) + has(EMA_PREFIX)
    if unet_keys == 0:
        if has("down_blocks.") and has("up_blocks.") and any(".attentions." in k for k in keys):
            refuse("a single diffusers UNet file (pass the whole diffusers folder instead)")
        if has(VAE_PREFIX) or has("encoder.") or has("decoder.") or has("vae."):
            refuse("a VAE-only checkpoint")
        if has(TEXT_PREFIX) or has("text_model.") or has("cond_stage_model."):
            refuse("a text-encoder-only checkpoint")
        refuse(f"a file with no Stable Diffusion UNet keys (first key: {keys[0]!r})")
    if has(UNET_PREFIX + "joint_blocks.") or has(UNET_PREFIX + "double_blocks."):
        refuse("a transformer-based model (SD-3 / Flux), not a UNet checkpoint")
    family: Family = "SD-2.x" if has(OPEN_CLIP_PREFIX) else "SD-1.x"
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        task = OTHER_TASKS.get(conv_in[1], f"{conv_in[1]} input channels")
        depth = ", with a MiDaS depth model" if has("depth_model.") else ""
        refuse(f"an {family} UNet for another task: {task}{depth}")
    if has("embedder.") or has("noise_augmentor."):
        refuse(f"an {family} unCLIP checkpoint (UNet conditioned on CLIP image embeddings)")
    if has(UNET_PREFIX + "label_emb."):
        refuse("a class-conditioned UNet (label_emb: SDXL or an upscaler)")
    for k in keys:
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            width = shapes[k][-1]
            if width == 2048:
                refuse("an SDXL checkpoint (2048-wide cross-attention)")
            break  # any other width is checked against the config's shapes
    if not has(VAE_PREFIX):
        refuse("a UNet-only checkpoint (no first_stage_model. VAE keys)")
    if not has(TEXT_PREFIX) and not has(OPEN_CLIP_PREFIX):
        refuse(
            "a checkpoint without a text encoder (no cond_stage_model.transformer. CLIP or "
            "cond_stage_model.model. OpenCLIP keys)"
        )
    return family
