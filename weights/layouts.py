"""Key maps from the real-world SD-1.x / SD-2.x checkpoint layouts to our parameter names.

Our names are the original CompVis keys with the component prefix stripped (docs/weights.md, "Key
mapping"), so the original layout only needs its prefixes removed (plus the EMA choice, "EMA"), and
the diffusers layout is mapped block by block with the rules of docs/weights.md, generated from the config so any
SD-1/SD-2 shape (the tiny test pipelines included) maps the same way as the real models. SD-2's
UNet and VAE keys are SD-1's (its linear proj_in/proj_out only change shapes); its text encoder is
stored in OpenCLIP's layout, which `text_from_open_clip` maps onto transformers' CLIP names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from ldm.config import UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."  # SD-1: transformers' CLIPTextModel names
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD-2: OpenCLIP's text tower (Stability-AI/stablediffusion)
EMA_PREFIX = "model_ema."
MIN_EMA_KEYS = 100  # diffusers' rule: fewer model_ema keys are leftover scalars, not an EMA copy

UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
# Both the current and the legacy (query/key/value/proj_attn) diffusers names of the VAE attention.
VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj_out",
    "proj_attn": "proj_out",
}


@dataclass(frozen=True)
class Rule:
    """Keys starting with `source` move under `target`; the first component after it is renamed."""

    source: str
    target: str
    renames: tuple[tuple[str, str], ...] = ()

    def apply(self, key: str) -> str | None:
        if not key.startswith(self.source):
            return None
        rest = key[len(self.source) :]
        for old, new in self.renames:
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        return self.target + rest


def _unet_rules(cfg: UNetConfig) -> list[Rule]:
    resnet = tuple(UNET_RESNET_RENAMES.items())
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    rules = [
        Rule("time_embedding.linear_1.", "time_embed.0."),
        Rule("time_embedding.linear_2.", "time_embed.2."),
        Rule("conv_in.", "input_blocks.0.0."),
        Rule("conv_norm_out.", "out.0."),
        Rule("conv_out.", "out.2."),
        Rule("mid_block.resnets.0.", "middle_block.0.", resnet),
        Rule("mid_block.attentions.0.", "middle_block.1."),
        Rule("mid_block.resnets.1.", "middle_block.2.", resnet),
    ]
    for b in range(n):
        for j in range(per):
            i = 1 + b * (per + 1) + j  # input_blocks index: conv_in, then per+1 entries per level
            rules.append(Rule(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", resnet))
            rules.append(Rule(f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1."))
        if b < n - 1:
            rules.append(Rule(f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (per + 1)}.0.op."))
    for b in range(n):  # up_blocks[b] is level n-1-b
        attention = cfg.attention_levels[n - 1 - b]
        for j in range(per + 1):
            i = b * (per + 1) + j
            rules.append(Rule(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0.", resnet))
            rules.append(Rule(f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1."))
        if b < n - 1:
            i, sub = b * (per + 1) + per, 2 if attention else 1
            rules.append(Rule(f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{i}.{sub}.conv."))
    return rules


def _vae_rules(cfg: VAEConfig) -> list[Rule]:
    resnet, attn = tuple(VAE_RESNET_RENAMES.items()), tuple(VAE_ATTENTION_RENAMES.items())
    n = len(cfg.block_out_channels)
    rules = [Rule("quant_conv.", "quant_conv."), Rule("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.conv_in.", f"{part}.conv_in."),
            Rule(f"{part}.conv_out.", f"{part}.conv_out."),
            Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
            Rule(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", resnet),
            Rule(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", resnet),
            Rule(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", attn),
        ]
    for i in range(n):
        k = n - 1 - i  # the decoder's up path is stored in reverse order in the original layout
        for j in range(cfg.layers_per_block + 1):  # the decoder has one ResnetBlock more per level
            rules.append(Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", resnet))
            rules.append(Rule(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{k}.block.{j}.", resnet))
        rules.append(Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{k}.upsample.conv."))
    return rules


def _rename(state: dict[str, Tensor], rules: list[Rule]) -> tuple[dict[str, Tensor], list[str]]:
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        for rule in rules:
            new = rule.apply(key)
            if new is not None:
                out[new] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def unet_from_diffusers(state: dict[str, Tensor], cfg: UNetConfig) -> tuple[dict[str, Tensor], list[str]]:
    """diffusers UNet2DConditionModel keys -> ours; also returns the keys no rule matched."""
    return _rename(state, _unet_rules(cfg))


def vae_from_diffusers(state: dict[str, Tensor], cfg: VAEConfig) -> tuple[dict[str, Tensor], list[str]]:
    """diffusers AutoencoderKL keys -> ours; attention projections become 1x1 convs [C, C, 1, 1]."""
    renamed, unknown = _rename(state, _vae_rules(cfg))
    return vae_attention_to_conv(renamed), unknown


def text_from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIPTextModel keys (with or without `text_model.`) -> ours; position_ids is a buffer, dropped."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        out[key] = value
    return out


# OpenCLIP text tower (open_clip: model.py `_build_text_tower`, transformer.py
# `ResidualAttentionBlock`) -> transformers' CLIPTextModel names, per residual block.
OPEN_CLIP_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
OPEN_CLIP_RENAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",  # a bare Parameter in OpenCLIP
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# Only CLIP's pooled output uses the projection and the logit scale; SD-2 reads the token states.
OPEN_CLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}


def text_from_open_clip(state: dict[str, Tensor], num_layers: int) -> tuple[dict[str, Tensor], list[str]]:
    """OpenCLIP text keys (prefix stripped) -> ours; also returns the keys that fit no rule.

    SD-2 reads the penultimate residual block, so block `num_layers` (the last of OpenCLIP's
    tower, which the config does not build) is dropped; any block past it is left unmatched.
    The fused attention in-projection `in_proj_weight` [3D, D] (and its bias) is nn.MultiheadAttention's
    q, k, v stacked in that order along dim 0, split here into q_proj, k_proj, v_proj.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in OPEN_CLIP_RENAMES:
            out[OPEN_CLIP_RENAMES[key]] = value
            continue
        if key in OPEN_CLIP_UNUSED:
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if m is None or int(m[1]) > num_layers:
            unknown.append(key)
            continue
        if int(m[1]) == num_layers:
            continue  # the final block, whose output SD-2 never reads
        base, rest = f"encoder.layers.{m[1]}.", m[2]
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            # (3D, D) -> 3 x (D, D); the bias (3D,) -> 3 x (D,)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}self_attn.{proj}.{kind}"] = part
            continue
        module, _, kind = rest.rpartition(".")
        if module in OPEN_CLIP_BLOCK_RENAMES and kind in ("weight", "bias"):
            out[f"{base}{OPEN_CLIP_BLOCK_RENAMES[module]}.{kind}"] = value
        else:
            unknown.append(key)
    return out, unknown


def vae_attention_to_conv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mid-block attention projections as 1x1 convs: diffusers stores them as linear [C, C], and
    original-layout files converted from diffusers sometimes do too."""
    return {
        k: (
            v[:, :, None, None] if ".mid.attn_1." in k and k.endswith("weight") and v.ndim == 2 else v
        )  # -> [C, C, 1, 1]
        for k, v in state.items()
    }


def ema_key(unet_key: str) -> str:
    """`input_blocks.1.0.in_layers.0.weight` -> `model_ema.diffusion_modelinput_blocks10in_layers0weight`."""
    return EMA_PREFIX + "diffusion_model" + unet_key.replace(".", "")


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
