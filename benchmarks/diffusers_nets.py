"""Our networks' weights in diffusers' and transformers' classes: the oracle side of the tests and benchmarks.

`diffusers_unet(cfg)`, `diffusers_vae(cfg)`, `transformers_clip(cfg)` build the reference class
shaped like one of our configs; `to_diffusers_unet` / `to_diffusers_vae` / `to_transformers_clip`
carry a state dict of ours across by an independent key map (our names are the original
checkpoint's, so diffusers' own single-file conversion code reads them); `diffusers_folder` writes
a whole model as a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), which
`diffusers.StableDiffusionPipeline.from_pretrained` and `invedit convert` both read.

diffusers and transformers are imported inside the functions: they are test and benchmark
dependencies only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm.config import SDConfig, TextConfig, UNetConfig, VAEConfig
from ldm.files import write_json
from ldm.model import StableDiffusion

# the DDIM scheduler the references build (and our samplers/schedule.py reproduces)
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "steps_offset": 1, "trained_betas": None,
}


def diffusers_unet(cfg: UNetConfig) -> Any:
    import diffusers

    levels = range(len(cfg.block_out_channels))
    return diffusers.UNet2DConditionModel(
        sample_size=32,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if cfg.attention_levels[i] else "DownBlock2D" for i in levels),
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if cfg.attention_levels[i] else "UpBlock2D" for i in reversed(levels)
        ),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.num_heads,  # diffusers' legacy name for the head count
        cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
    )


def diffusers_vae(cfg: VAEConfig) -> Any:
    import diffusers

    n = len(cfg.block_out_channels)
    return diffusers.AutoencoderKL(
        block_out_channels=cfg.block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scale_factor,
    )


def transformers_clip(cfg: TextConfig) -> Any:
    import transformers

    return transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_positions,
            hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps,
        )
    )


def to_diffusers_unet(ours: dict, reference: Any) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ckpt = {"model.diffusion_model." + k: v for k, v in ours.items()}
    return convert_ldm_unet_checkpoint(ckpt, config=dict(reference.config))


def to_diffusers_vae(ours: dict, reference: Any) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ckpt = {"first_stage_model." + k: v for k, v in ours.items()}
    return convert_ldm_vae_checkpoint(ckpt, config=dict(reference.config))


def to_transformers_clip(ours: dict, reference: Any) -> dict:
    # transformers >= 5.6 has no `text_model.` level; older versions do.
    prefix = "text_model." if any(k.startswith("text_model.") for k in reference.state_dict()) else ""
    return {prefix + k: v for k, v in ours.items()}


def diffusers_networks(config: SDConfig, states: dict[str, dict]) -> dict[str, Any]:
    """{"unet", "vae", "text_encoder"}: the reference classes holding our state dicts (loaded
    strictly, so a name or shape of ours that differed from the original layout fails here)."""
    with torch.device("meta"):
        unet, vae, text = diffusers_unet(config.unet), diffusers_vae(config.vae), transformers_clip(config.text)
    unet.load_state_dict(to_diffusers_unet(states["unet"], unet), strict=True, assign=True)
    vae.load_state_dict(to_diffusers_vae(states["vae"], vae), strict=True, assign=True)
    mapped = to_transformers_clip(states["text"], text)
    missing, unexpected = text.load_state_dict(mapped, strict=False, assign=True)
    if unexpected or set(missing) - {"text_model.embeddings.position_ids", "embeddings.position_ids"}:
        raise ValueError(f"text encoder keys: missing {missing}, unexpected {unexpected}")
    for name, buf in list(text.named_buffers()):  # position_ids stayed on the meta device
        if buf.is_meta:
            owner = text.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval()}


def diffusers_folder(sd: StableDiffusion, folder: Path) -> Path:
    """Write `sd` as a diffusers folder (safetensors), with the bundled tokenizer files and the
    references' DDIM scheduler config."""
    from ldm.tokenizer import write_bundled_tokenizer

    states = {name: getattr(sd, name).state_dict() for name in ("unet", "vae", "text")}
    nets = diffusers_networks(sd.config, states)
    for name, net in nets.items():
        net.save_pretrained(folder / name, safe_serialization=True)
    write_bundled_tokenizer(folder / "tokenizer", sd.config.text.pad_token)
    write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    })
    return folder
