"""Frozen configurations of the three Stable Diffusion networks, with the SD-1.4 values as defaults.

The facts people trip on are written next to the field they concern. The dataclasses describe any
diffusers `UNet2DConditionModel` / `AutoencoderKL` / `CLIPTextModel` of the SD-1 and SD-2 families
(mirrored down/up paths, one optional SpatialTransformer per ResBlock), so SD-1.4, SD-2.x and the
tiny random pipelines are all just values: the presets at the bottom (`SD14`, `SD20_BASE`,
`SD20_V`, `SD21_BASE`, `SD21_V`, `TINY`, `TINY_SD2`). The code never asks which model it is; it
reads the field that matters (projection kind, head counts, activation, prediction type, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[PredictionType, ...] = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    # Width of each resolution level; level 0 is the full latent resolution (64x64 at 512 px).
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Whether the ResBlocks of a level are followed by a SpatialTransformer. SD-1.4 has attention
    # on levels 0-2 and none at level 3 (8x8 at 512 px); the middle block always has one.
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    # Heads per level (the middle block uses the last level's). SD-1.4: 8 everywhere, so the
    # head dims are 40, 80, 160 (and 160 in the middle). SD-2.x fixes the head *dim* at 64
    # instead, so the count grows with the width: 5, 10, 20, 20. diffusers calls this field
    # `attention_head_dim` although it holds the head *count*.
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    layers_per_block: int = 2  # ResBlocks per level on the way down; one more on the way up
    context_dim: int = 768  # CLIP width; SD-2 uses 1024 (that is how we tell them apart)
    transformer_depth: int = 1
    norm_groups: int = 32
    resnet_eps: float = 1e-5  # GroupNorm32 in the ResBlocks and the final `out` norm
    transformer_norm_eps: float = 1e-6  # the SpatialTransformer's GroupNorm (hard-coded upstream)
    # SD-1 uses 1x1 *convolutions* for proj_in/proj_out; SD-2 switched to linear layers, applied
    # to the flattened tokens (same parameters up to the trailing 1x1, different key shapes).
    use_linear_projection: bool = False
    # Compute attention in float32 when the weights are fp16/bf16. SD-2.1-768-v overflows fp16 in
    # Q K^T on attention paths that do not accumulate in fp32 (Stability-AI/stablediffusion
    # README: "ATTN_PRECISION"; diffusers' `upcast_attention` in that model's unet/config.json).
    upcast_attention: bool = False
    # What the UNet was trained to output (Salimans & Ho 2022, §4 for v): the noise eps
    # ("epsilon", SD-1.x, SD-2.x 512-base) or v = sqrt(abar) eps - sqrt(1 - abar) x0
    # ("v_prediction", SD-2.x 768-v). The names are diffusers' scheduler `prediction_type`.
    prediction_type: PredictionType = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r}: expected one of {PREDICTION_TYPES}")
        n = len(self.block_out_channels)
        if len(self.attention_levels) != n or len(self.num_heads) != n:
            raise ValueError("block_out_channels, attention_levels and num_heads need one entry per level")
        for ch, heads in zip(self.block_out_channels, self.num_heads):
            if ch % heads:
                raise ValueError(f"{ch} channels do not split into {heads} heads")
            if ch % self.norm_groups:
                raise ValueError(f"{ch} channels do not split into {self.norm_groups} groups")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def head_dim(self, level: int) -> int:
        return self.block_out_channels[level] // self.num_heads[level]


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder: 2 ResnetBlocks per level; decoder: 3
    latent_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6  # every VAE GroupNorm, unlike the UNet's 1e-5
    # Latents fed to the UNet are scale_factor * posterior mean; decode divides by it.
    scale_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


HIDDEN_ACTS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class TextConfig:
    """CLIP ViT-L/14's text tower by default; SD-2.x uses OpenCLIP ViT-H/14's (see SD20_BASE)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    # Layers *built*. SD-1 reads the last layer's output; SD-2 reads the penultimate one of
    # OpenCLIP's 24 (then the final LayerNorm), so its 24th layer is never built (as in diffusers).
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    # OpenAI CLIP: "quick_gelu" = x * sigmoid(1.702 x); OpenCLIP ViT-H: "gelu" = the exact erf GELU.
    hidden_act: str = "quick_gelu"
    # The token prompts are padded with to 77. SD-1 was trained with EOS padding; SD-2's tokenizer
    # pads with "!" (id 0). A checkpoint's own tokenizer files override this at conversion.
    pad_token: str = "<|endoftext|>"

    def __post_init__(self) -> None:
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: expected one of {HIDDEN_ACTS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} does not split into {self.num_heads} heads")


@dataclass(frozen=True)
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SDConfig":
        """Inverse of to_dict; unknown or missing fields are errors, lists become tuples."""

        def build(kind: type, values: dict[str, Any]) -> Any:
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        unknown = set(data) - {"unet", "vae", "text"}
        if unknown:
            raise ValueError(f"unknown SDConfig sections: {sorted(unknown)}")
        return cls(
            unet=build(UNetConfig, data.get("unet", {})),
            vae=build(VAEConfig, data.get("vae", {})),
            text=build(TextConfig, data.get("text", {})),
        )


SD14 = SDConfig()

# SD-2.x (Stability-AI/stablediffusion configs/stable-diffusion/v2-inference.yaml and
# v2-inference-v.yaml): the SD-1 UNet with 64-wide heads, linear projections and 1024-wide
# cross-attention; the OpenCLIP ViT-H/14 text tower read at its penultimate layer; SD-1's VAE.
# 2.0 and 2.1 share the architecture; the 512 px "base" models predict eps, the 768 px models v.
SD2_HEAD_DIM = 64
_SD2_UNET = UNetConfig(
    num_heads=tuple(c // SD2_HEAD_DIM for c in UNetConfig().block_out_channels),  # (5, 10, 20, 20)
    context_dim=1024,
    use_linear_projection=True,
)
_SD2_TEXT = TextConfig(
    hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu", pad_token="!"
)
SD20_BASE = SDConfig(unet=_SD2_UNET, text=_SD2_TEXT)
SD20_V = SDConfig(unet=dataclasses.replace(_SD2_UNET, prediction_type="v_prediction"), text=_SD2_TEXT)
SD21_BASE = SD20_BASE  # 2.1-base differs from 2.0-base only in its weights
# 2.1-768-v is the model whose attention needs float32 (diffusers' config for it sets upcast).
SD21_V = SDConfig(
    unet=dataclasses.replace(_SD2_UNET, prediction_type="v_prediction", upcast_attention=True), text=_SD2_TEXT
)

# The tiny random pipeline the reference oracle ran on (tests/data/tiny-sd): four levels,
# attention only at the middle two (32x32 and 16x16 latents at 512 px), 2 heads, context 32.
# Small enough for unit tests at 512 px on a CPU, and shaped like SD so every rule applies.
TINY = SDConfig(
    unet=UNetConfig(
        block_out_channels=(32, 32, 64, 64),
        attention_levels=(False, True, True, False),
        num_heads=(2, 2, 2, 2),
        context_dim=32,
    ),
    vae=VAEConfig(block_out_channels=(32, 32, 64, 64)),
    text=TextConfig(hidden_size=32, intermediate_size=37, num_layers=5, num_heads=4),
)

# TINY with every SD-2 trait: linear projections, one head dim (16) with per-level head counts,
# the GELU text tower padded with "!", v-prediction and float32 attention.
TINY_SD2 = SDConfig(
    unet=dataclasses.replace(
        TINY.unet, num_heads=(2, 2, 4, 4), use_linear_projection=True, upcast_attention=True,
        prediction_type="v_prediction",
    ),  # fmt: skip
    vae=TINY.vae,
    text=dataclasses.replace(TINY.text, hidden_act="gelu", pad_token="!"),
)
