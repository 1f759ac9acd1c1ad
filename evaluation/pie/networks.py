"""The three scoring networks, loaded offline from the user's folders or the usual caches.

- CLIP ViT-L/14 (`--clip`): a transformers folder (config.json, model weights, tokenizer and
  preprocessor files), by default `openai/clip-vit-large-patch14` in the Hugging Face cache.
- DINO ViT-B/8 (`--dino`): a transformers ViTModel folder, by default `facebook/dino-vitb8` in the
  Hugging Face cache.
- LPIPS-SqueezeNet (`--lpips`): torchvision's SqueezeNet 1.1 ImageNet checkpoint
  (squeezenet1_1-b8a52dc0.pth), by default where torchvision caches it (torch hub's
  checkpoints/ folder). LPIPS's own linear heads ship inside torchmetrics.

Nothing is downloaded: a missing network is one line (a WeightsError) saying what is missing and
where to put it. Each loader is called only for the metrics asked for.

LPIPS: the network is squeeze_lpips.py's plain-torch SqueezeNet 1.1 with LPIPS on top, the
computation of torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")` without
torchvision (which torchmetrics would ask for the backbone, downloading it when not cached, and
whose PyPI wheel does not import beside a CPU-only torch). The backbone is read from the
checkpoint file, every tensor checked; the heads from torchmetrics' bundled file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.errors import WeightsError

CLIP_DEFAULT = "openai/clip-vit-large-patch14"
DINO_DEFAULT = "facebook/dino-vitb8"
SQUEEZENET_FILE = "squeezenet1_1-b8a52dc0.pth"  # torchvision's name for SqueezeNet1_1_Weights.IMAGENET1K_V1


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _missing(what: str, name: str, default: str, files: str, option: str, err: Exception) -> WeightsError:
    if Path(name).is_dir():  # the folder is there but unusable: say why
        where = f"folder {name} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    else:
        where = f"{name!r} (no such folder, and not in the Hugging Face cache {_hub_cache()})"
    return WeightsError(
        f"{what} weights not found: {where}; download {default} ({files}) into a folder and pass {option} FOLDER, "
        "or put it in the Hugging Face cache"
    )


def load_clip(source: str | None = None) -> tuple[nn.Module, Any]:
    """(CLIPModel, CLIPProcessor with the PIL image processor) from a folder or a cached hub id."""
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    try:  # the PIL-based image processor, as the reference's transformers of 2023 used
        from transformers import CLIPImageProcessorPil as PilImageProcessor  # transformers >= 5
    except ImportError:
        from transformers import CLIPImageProcessor as PilImageProcessor  # transformers 4: PIL/numpy

    name = source or CLIP_DEFAULT
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=True)
        processor = CLIPProcessor(
            image_processor=PilImageProcessor.from_pretrained(name, local_files_only=True),
            tokenizer=CLIPTokenizer.from_pretrained(name, local_files_only=True),
        )
    except (OSError, ValueError) as err:
        raise _missing("CLIP ViT-L/14", name, CLIP_DEFAULT, "config, weights, tokenizer and preprocessor files", "--clip", err) from None
    return model, processor


def load_dino(source: str | None = None) -> nn.Module:
    """transformers ViTModel (no pooler) from a folder or a cached hub id."""
    from transformers import ViTModel

    name = source or DINO_DEFAULT
    try:
        return ViTModel.from_pretrained(name, add_pooling_layer=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise _missing("DINO ViT-B/8", name, DINO_DEFAULT, "config and weights", "--dino", err) from None


def squeezenet_path(source: str | os.PathLike[str] | None = None) -> Path:
    """The SqueezeNet 1.1 checkpoint file: the one given, else torchvision's cached copy."""
    path = Path(source) if source else Path(torch.hub.get_dir()) / "checkpoints" / SQUEEZENET_FILE
    if not path.is_file():
        raise WeightsError(
            f"LPIPS backbone weights not found at {path}: put torchvision's SqueezeNet 1.1 ImageNet checkpoint "
            f"({SQUEEZENET_FILE}) there, or pass --lpips FILE"
        )
    return path


def load_lpips(source: str | os.PathLike[str] | None = None) -> nn.Module:
    """LPIPS-SqueezeNet with the backbone read from `squeezenet_path(source)` and torchmetrics'
    heads. Call it as net(img1, img2) on (N, 3, H, W) images in [-1, 1]; returns (N, 1, 1, 1)."""
    from evaluation.pie.squeeze_lpips import SqueezeLpips, backbone_state, heads_path, heads_state

    path = squeezenet_path(source)
    heads = heads_path()
    if heads is None or not heads.is_file():
        raise WeightsError(f"LPIPS's linear heads come with torchmetrics ({heads or 'not installed'}): "
                           "pip install -e '.[eval]'")
    network = SqueezeLpips()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: cannot read the SqueezeNet checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path}: not torchvision's SqueezeNet 1.1 checkpoint (a {type(checkpoint).__name__})")
    state = {**backbone_state(checkpoint), **heads_state(torch.load(heads, map_location="cpu", weights_only=True))}
    not_squeezenet = f"{path}: not torchvision's SqueezeNet 1.1 checkpoint"
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise WeightsError(f"{not_squeezenet} ({' '.join(str(err).split())[:300]})") from None
    if missing or unexpected:
        raise WeightsError(f"{not_squeezenet} (missing {len(missing)} tensors, e.g. {(missing or ['-'])[0]}; "
                           f"{len(unexpected)} unexpected)")
    return network.eval()
