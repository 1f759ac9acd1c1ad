"""The CLIP text transformer Stable Diffusion conditions on (Radford et al. 2021), HF names.

Pre-LN causal transformer: x += attn(LN1(x)); x += MLP(LN2(x)); the output SD uses is the final
LayerNorm applied to the last *built* layer (not the pooled output). Two towers, one code path:
- SD-1: OpenAI CLIP ViT-L/14, quick-GELU (x * sigmoid(1.702 x)), all 12 layers.
- SD-2: OpenCLIP ViT-H/14 (Cherti et al. 2023), exact GELU, read at the penultimate of its 24
  layers and then `ln_final` (Stability-AI/stablediffusion: ldm/modules/encoders/modules.py,
  `FrozenOpenCLIPEmbedder`, layer="penultimate"); the config builds 23 layers, as diffusers does.
Parameter names follow transformers' CLIPTextModel without the `text_model.` prefix
(transformers >= 5.6 flattening), which is SD-1's original `cond_stage_model.transformer.text_model.`
with that stripped; SD-2's OpenCLIP names are mapped by weights/layouts.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from kernels.attention import fused_attention
from ldm.config import TextConfig


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # (B, 77, heads*d) -> (B, heads, 77, d)
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        # Causal mask and no padding mask: padded positions see the prompt, never the reverse.
        return self.out_proj(rearrange(fused_attention(q, k, v, causal=True), "b h n d -> b n (h d)"))


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # F.gelu: the exact erf form


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, ids: Tensor) -> Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        """ids: (B, 77) token ids -> last_hidden_state (B, 77, hidden)."""
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))
