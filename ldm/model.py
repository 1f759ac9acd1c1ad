"""StableDiffusion: the three networks, the tokenizer and the config, and how to load them.

Our on-disk format (docs/weights.md) is one directory: unet.safetensors, vae.safetensors,
text.safetensors (tensor names = our module names), config.json (SDConfig: the architecture, the
prediction type and the padding token, so every command knows which model it runs) and tokenizer/
(files transformers reads). `weights/convert.py` produces it from the real-world layouts. Loading
checks every key, shape and dtype against the config before any tensor is copied, then assigns
the tensors to modules built on the meta device, so a full model costs no random initialisation.
The noise schedule belongs to samplers/, so nothing here knows about sampling.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ldm.config import TINY, TINY_SD2, SDConfig
from ldm.errors import WeightsError
from ldm.safetensors_header import check_safetensors_header
from ldm.text import CLIPTextModel
from ldm.tokenizer import Tokenizer
from ldm.context import AttnSite, ResSite
from ldm.unet import UNet
from ldm.vae import AutoencoderKL

COMPONENTS = ("unet", "vae", "text")
# The random-weight models `--model` builds in memory instead of loading a directory: every command
# runs on them without weights (the tests do). "tiny-random-sd2" has every SD-2 trait, v-prediction
# included.
TINY_MODELS: Mapping[str, SDConfig] = MappingProxyType({"tiny-random": TINY, "tiny-random-sd2": TINY_SD2})
FLOAT_DTYPES = {"F32", "F16", "BF16"}  # safetensors header names
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_networks(config: SDConfig, device: str | torch.device = "meta") -> dict[str, nn.Module]:
    with torch.device(device):
        return {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae), "text": CLIPTextModel(config.text)}


def random_state_dict(module: nn.Module, generator: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
    """A seeded random state for `module` (built on any device): fan-in scaled weights, norm
    weights near 1, small biases. Deterministic for a given generator state, independent of the
    global RNG."""
    state = {}
    for name, p in module.state_dict().items():
        if p.ndim >= 2:
            std = 1.0 / math.sqrt(math.prod(p.shape[1:]))
            value = torch.randn(p.shape, generator=generator) * std
        elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
            value = 1.0 + 0.05 * torch.randn(p.shape, generator=generator)
        else:
            value = 0.02 * torch.randn(p.shape, generator=generator)
        state[name] = value.to(dtype)
    return state


def read_safetensors(path: Path, expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """Read `path`, checking its header, key set, shapes and float dtypes against `expected` first."""
    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    header = check_safetensors_header(path)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not match the config: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    for key, info in sorted(header.items()):
        if tuple(info["shape"]) != tuple(expected[key].shape):
            raise WeightsError(f"{path}: {key} has shape {tuple(info['shape'])}, the config expects {tuple(expected[key].shape)}")
        if info["dtype"] not in FLOAT_DTYPES:
            raise WeightsError(f"{path}: {key} has dtype {info['dtype']}; expected a floating type (F32/F16/BF16)")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise WeightsError(f"{path} is corrupt: {err}") from None


class StableDiffusion(nn.Module):
    def __init__(self, config: SDConfig, unet: UNet, vae: AutoencoderKL, text: CLIPTextModel, tokenizer: Tokenizer):
        super().__init__()
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text = text
        self.tokenizer = tokenizer

    @classmethod
    def from_state_dicts(
        cls, config: SDConfig, states: dict[str, dict[str, Tensor]], tokenizer: Tokenizer
    ) -> "StableDiffusion":
        """Assign complete state dicts (strictly checked by torch) to meta-built networks."""
        nets = build_networks(config)
        for name, net in nets.items():
            net.load_state_dict(states[name], strict=True, assign=True)
        return cls(config, nets["unet"], nets["vae"], nets["text"], tokenizer).eval().requires_grad_(False)

    @classmethod
    def tiny_random(cls, seed: int = 0, dtype: torch.dtype = torch.float32, config: SDConfig = TINY) -> "StableDiffusion":
        """A small random-weight model built in memory (no files), with the real CLIP vocabulary."""
        generator = torch.Generator().manual_seed(seed)
        nets = build_networks(config)
        states = {name: random_state_dict(net, generator, dtype) for name, net in nets.items()}
        return cls.from_state_dicts(config, states, Tokenizer.bundled(config.text.pad_token))

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "StableDiffusion":
        """Load our directory format; dtype None keeps the stored dtype."""
        directory = Path(directory)
        config = read_config(directory)
        tokenizer = read_tokenizer(directory, config)
        expected = {name: net.state_dict() for name, net in build_networks(config).items()}
        states = {}
        for name in COMPONENTS:
            tensors = read_safetensors(directory / f"{name}.safetensors", expected[name])
            states[name] = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}
        return cls.from_state_dicts(config, states, tokenizer)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def facts(self) -> ModelFacts:
        return ModelFacts(self.config, self.tokenizer, tuple(self.unet.attn_sites()), tuple(self.unet.res_sites()))

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> CLIP last_hidden_state (B, 77, hidden), the UNet's cross-attention context."""
        return self.text(self.tokenizer(prompts).to(self.device))


@dataclass(frozen=True)
class ModelFacts:
    """What a method needs to know of a model before any weight is loaded: its tokenizer and the
    UNet's attention and ResBlock sites (built on the meta device, so they cost nothing). Methods
    check prompts, words and layer choices against these, so bad input is refused before compute."""

    config: SDConfig
    tokenizer: Tokenizer
    attn_sites: tuple[AttnSite, ...]
    res_sites: tuple[ResSite, ...]

    @classmethod
    def of(cls, config: SDConfig, tokenizer: Tokenizer) -> "ModelFacts":
        unet = build_networks(config)["unet"]
        return cls(config, tokenizer, tuple(unet.attn_sites()), tuple(unet.res_sites()))


def read_config(directory: str | Path) -> SDConfig:
    """The SDConfig of a model directory (config.json), with one-line errors."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{directory} is not an invedit model directory (no config.json); convert it with `invedit convert`")
    try:
        return SDConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{config_path} is not a valid invedit model config: {err}") from None


def read_tokenizer(directory: str | Path, config: SDConfig) -> Tokenizer:
    """A model directory's tokenizer, padding as its config says, checked to fit the text encoder."""
    tokenizer = Tokenizer.from_dir(Path(directory) / "tokenizer", config.text.pad_token)
    tokenizer.check_fits(config.text.vocab_size, str(Path(directory) / "tokenizer"))
    return tokenizer


def model_facts(spec: str) -> ModelFacts:
    """ModelFacts of a tiny random model (TINY_MODELS) or a converted directory, reading no weights."""
    if spec in TINY_MODELS:
        config = TINY_MODELS[spec]
        return ModelFacts.of(config, Tokenizer.bundled(config.text.pad_token))
    config = read_config(spec)
    return ModelFacts.of(config, read_tokenizer(spec, config))


def fast_bf16(device: str | torch.device) -> bool:
    """Whether `device` is a CPU with bf16 matrix units (AMX tiles or AVX-512 bf16), where a bf16 UNet
    runs several times faster than fp32 (docs/performance.md, "bf16 on a CPU")."""
    if torch.device(device).type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own feature checks
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def default_dtype(device: str | torch.device) -> torch.dtype | None:
    """The networks' dtype when the user names none: bf16 on a CPU with bf16 units, else None (the
    dtype the weights are stored in). The DDIM arithmetic stays float32 whatever this is."""
    return torch.bfloat16 if fast_bf16(device) else None


def open_model(spec: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> StableDiffusion:
    """A name in TINY_MODELS builds that in-memory test model; anything else is a converted directory."""
    if spec in TINY_MODELS:
        return StableDiffusion.tiny_random(dtype=dtype or torch.float32, config=TINY_MODELS[spec]).to(device)
    return StableDiffusion.load(spec, dtype=dtype, device=device)
