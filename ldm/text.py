"""The CLIP ViT-L/14 text transformer SD-1.4 conditions on (Radford et al. 2021), HF names.

Pre-LN causal transformer: x += attn(LN1(x)); x += MLP(LN2(x)) with quick-GELU
(x * sigmoid(1.702 x)); the output SD uses is `last_hidden_state`, the final LayerNorm of the
last layer (not the pooled output, not the penultimate layer). Parameter names follow
transformers' CLIPTextModel without the `text_model.` prefix (transformers >= 5.6 flattening),
which is the original checkpoint's `cond_stage_model.transformer.text_model.` with that stripped.
"""

from __future__ import annotations

import torch
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


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
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
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"SD-1 text encoders use quick_gelu, not {cfg.hidden_act}")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        """ids: (B, 77) token ids -> last_hidden_state (B, 77, hidden)."""
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))
