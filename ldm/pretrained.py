"""Pretrained transformers models that some methods read beside Stable Diffusion, loaded offline.

StyleDiffusion encodes the photo with CLIP's vision tower (`--clip-vision`), pix2pix-zero may caption
it with BLIP (`--captioner`). Both are transformers models given as a folder (what
`save_pretrained` writes) or as a hub id already in the Hugging Face cache. Nothing is downloaded:
a model that is not there is one line, a `WeightsError` naming the option, what was tried and what
to put where. Models come back in eval mode with every parameter frozen (no method ever trains
them; gradients may flow *through* them only to inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from torch import nn

from ldm.errors import WeightsError

T = TypeVar("T")


def hub_cache() -> str:
    """Where the Hugging Face hub keeps downloaded models on this machine."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def load_pretrained(load: Callable[[str], T], source: str, *, what: str, option: str, default: str, files: str) -> T:
    """`load(source)` (a transformers `from_pretrained` with local_files_only=True), or a one-line
    WeightsError: the folder exists but is unusable (and why), or neither a folder nor cached."""
    try:
        loaded = load(source)
    except (OSError, ValueError, KeyError) as err:
        if Path(source).is_dir():
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            where = f"folder {source} is not a usable {what} ({reason})"
        else:
            where = f"{source!r} is neither a folder nor in the Hugging Face cache {hub_cache()}"
        raise WeightsError(f"{what} not found: {where}; put {default} ({files}) in a folder and pass {option} FOLDER, "
                           "or in the Hugging Face cache") from None
    if isinstance(loaded, nn.Module):
        loaded.eval().requires_grad_(False)
    return loaded
