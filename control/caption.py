"""A caption of the photo from BLIP (Li et al., "BLIP: Bootstrapping Language-Image Pre-training",
ICML 2022), pix2pix-zero's source of the prompt it inverts and reconstructs with.

The reference captions with LAVIS' `blip_caption` / `base_coco` model (cure-lab/PnPInversion
`run_editing_pix2pix_zero.py`): the text decoder is primed with "a picture of ", beam search with 3
beams, 10 to 30 tokens (the prompt included), no repetition penalty, and the prompt's characters are
cut from the decoded text. transformers' `BlipForConditionalGeneration` is the same network
(`Salesforce/blip-image-captioning-base` is BLIP base fine-tuned on COCO captions); its
`generate` primes the decoder as LAVIS does ([DEC] in place of [CLS], no trailing [SEP]). The
image goes through BLIP's processor (384 x 384 bicubic, CLIP's mean and std), PIL-based as the
reference's torchvision-on-PIL pipeline.

The model is loaded offline from a folder or the hub cache (`--captioner`, ldm/pretrained.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.pretrained import load_pretrained

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
PROMPT = "a picture of "  # LAVIS blip_caption's prompt
BEAMS, MIN_LENGTH, MAX_LENGTH = 3, 10, 30


class Captioner:
    """`captioner(photo)`: (H, W, 3) uint8 -> the caption, as LAVIS' BLIP captioner gives it."""

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model  # transformers BlipForConditionalGeneration, frozen
        self.processor = processor  # BlipProcessor

    @torch.no_grad()
    def __call__(self, photo: np.ndarray) -> str:
        from PIL import Image

        inputs = self.processor(images=Image.fromarray(photo), text=PROMPT, return_tensors="pt")
        ids = self.model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                                  num_beams=BEAMS, min_length=MIN_LENGTH, max_length=MAX_LENGTH, repetition_penalty=1.0)
        text = self.processor.decode(ids[0], skip_special_tokens=True)
        return " ".join(text[len(PROMPT):].split())  # LAVIS cuts the prompt's characters

    @classmethod
    def load(cls, source: str) -> "Captioner":
        """BLIP and its processor from a transformers folder or a hub id in the cache."""
        from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipProcessor

        try:  # the PIL image processor (transformers >= 5); before 5 the default one is PIL-based
            from transformers import BlipImageProcessorPil as ImageProcessor
        except ImportError:
            from transformers import BlipImageProcessor as ImageProcessor

        def load(name: str) -> tuple[nn.Module, Any]:
            model = BlipForConditionalGeneration.from_pretrained(name, local_files_only=True)
            processor = BlipProcessor(image_processor=ImageProcessor.from_pretrained(name, local_files_only=True),
                                      tokenizer=AutoTokenizer.from_pretrained(name, local_files_only=True))
            return model, processor

        model, processor = load_pretrained(load, source, what="BLIP captioner", option="--captioner",
                                           default=DEFAULT_CAPTIONER,
                                           files="config.json, the weights, the tokenizer and preprocessor files")
        return cls(model.eval().requires_grad_(False), processor)
