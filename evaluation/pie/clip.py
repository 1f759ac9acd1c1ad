"""CLIP similarity of an image and a prompt, as cure-lab/PnPInversion scores edits
(evaluation/matrics_calculator.py `calculate_clip_similarity`).

torchmetrics' CLIPScore with CLIP ViT-L/14 (Radford et al., "Learning Transferable Visual Models
From Natural Language Supervision", 2021): score = max(100 cos(image embedding, text embedding), 0),
so Table 1's values (~21-25) are CLIPScore's raw output. The image is the uint8 edit, 3 x H x W;
CLIP's processor resizes its short side to 224 (bicubic), center-crops 224 and normalises. For the
edited part the image is first multiplied by the 0/1 mask and cast back to uint8 (outside black, no
crop to the mask's box).

Two things differ from calling torchmetrics with a hub name, neither changing the score:
- the model and processor come from networks.py (a local folder or the hub cache, offline);
- transformers 5 returns model outputs, not tensors, from `get_image_features` /
  `get_text_features`, which torchmetrics 1.9 cannot divide by a norm; `_Features` hands it the
  projected embeddings (`pooler_output`), which are what those methods returned before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


class _Features(nn.Module):
    """The CLIP model as torchmetrics calls it: tensors from the two feature methods."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads the text length limit here

    @staticmethod
    def _tensor(output: Any) -> Tensor:
        return output if isinstance(output, Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class ClipScore:
    """`score(image, prompt, mask=None)` -> CLIPScore of an (H, W, 3) uint8 image (times the mask)."""

    def __init__(self, model: nn.Module, processor: Any, device: str | torch.device = "cpu"):
        from torchmetrics.multimodal import CLIPScore

        self.device = torch.device(device)
        features = _Features(model.eval())
        self.metric = CLIPScore(model_name_or_path=lambda: (features, processor)).to(self.device)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompt: str, mask: np.ndarray | None = None) -> float:
        if mask is not None:
            image = (image * mask[..., None]).astype(np.uint8)  # the reference's np.uint8(img * mask)
        tensor = torch.tensor(image).permute(2, 0, 1).to(self.device)  # (3, H, W) uint8
        score = self.metric(tensor, prompt)  # this pair's clamped score (forward = update + compute on the batch)
        self.metric.reset()  # nothing carries over between pairs
        return float(score)
