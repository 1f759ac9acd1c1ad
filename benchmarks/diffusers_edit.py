"""The baseline of `invedit bench edit`: DirectInversion + Prompt-to-Prompt written on diffusers, as a
user of diffusers writes it after the reference code (cure-lab/PnPInversion run_editing_p2p.py).

- load: `UNet2DConditionModel`, `AutoencoderKL`, transformers' `CLIPTextModel` and `CLIPTokenizer`
  and the references' `DDIMScheduler` from a diffusers folder;
- encode: VAE posterior mean x the scaling factor; the texts "", source, target in one call;
- inversion: DDIM inversion under the source prompt at guidance 1 (the reference's `next_step`,
  1 row per step), then DirectInversion's separate offset pass on [E(""), E(src)] at the editing
  guidance (2 rows per step): D[i] = L[S-1-i] - ddim_step(z, cfg(eps)), z = L[S-1-i];
- edit: rows [u_src, u_tgt, c_src, c_tgt] (4 per step) through diffusers attention processors that
  compute every attention map explicitly and hand it to a controller that stores it as the
  reference's AttentionStore does (the conditional half of every map at the levels that are 32x32
  and coarser at 512 px, summed over steps) and edits it in place as P2P refine does (target
  cross maps: refine mapper x the x2 reweight of the blend word, blended by the per-token
  cross-replace schedule; target self maps := source maps in the self window); after each
  `scheduler.step` the source latent gets D[i] and LocalBlend mixes the target towards the source;
- decode: the VAE decoder on [source, target].

350 UNet rows at 50 steps (50 + 100 + 200), against our fused form's 250. The token bookkeeping
(refine mapper, equalizer, cross-replace schedule, blend-word columns) is the host-side part of
control/words.py, the same for both sides; everything that runs per step is written here on
diffusers. The 512-px rules are applied by UNet level, as ours, so any size edits the same layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from control.words import cross_replace_schedule, equalizer, refinement_mapper, require_word
from ldm.tokenizer import MAX_LENGTH, Tokenizer


@dataclass(frozen=True)
class BaselineSpec:
    """PIE-Bench's P2P defaults for one DirectInversion + P2P refine + LocalBlend edit."""

    source: str
    target: str
    blend: tuple[str, str] | None
    steps: int = 50
    guidance: float = 7.5
    cross: float = 0.4
    self_: float = 0.6
    blend_start: float = 0.2
    blend_threshold: float = 0.3


@dataclass
class Baseline:
    """The diffusers pipeline parts of one model; `rows` counts UNet batch rows evaluated."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    rows: int = 0

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> "Baseline":
        import diffusers
        import transformers

        unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
        text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
        nets = [net.to(device).eval().requires_grad_(False) for net in (unet, vae, text)]
        return cls(*nets, tokenizer, scheduler, device, dtype)

    def eps(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.unet(x.to(self.dtype), t, encoder_hidden_states=context).sample.float()


class P2PStore:
    """The reference's AttentionStore + AttentionRefine/Reweight + LocalBlend, on explicit maps.

    Maps arrive as (4 * heads, N, M), rows [u_src, u_tgt, c_src, c_tgt]; only the conditional half
    is stored and edited, in place, as the reference does."""

    def __init__(self, tokenizer: Tokenizer, spec: BaselineSpec, levels: int) -> None:
        mapper, alphas = refinement_mapper(tokenizer, spec.source, spec.target)
        self.mapper, self.alphas = mapper, alphas  # (77,), (77,)
        weights = {spec.blend[1]: 2.0} if spec.blend is not None else None
        self.equalizer = equalizer(tokenizer, spec.target, weights) if weights else None
        self.cross_alpha = cross_replace_schedule(tokenizer, spec.target, spec.steps, spec.cross)  # (steps+1, 77)
        self.self_end = int(spec.self_ * spec.steps)
        self.blend_start = int(spec.blend_start * spec.steps)
        self.threshold = spec.blend_threshold
        self.levels = levels
        self.words = None
        if spec.blend is not None:
            cols = torch.zeros(2, MAX_LENGTH)
            cols[0, require_word(tokenizer, spec.source, spec.blend[0], "blend")] = 1
            cols[1, require_word(tokenizer, spec.target, spec.blend[1], "blend")] = 1
            self.words = cols
        self.step = 0
        self.step_store: dict[str, list[Tensor]] = {}
        self.attention_store: dict[str, list[Tensor]] = {}

    def edit(self, probs: Tensor, heads: int, is_cross: bool, place: str, level: int) -> Tensor:
        half = probs.shape[0] // 2
        cond = probs[half:].reshape(2, heads, *probs.shape[1:])  # a view: edits land in `probs`
        if is_cross:
            alpha = self.cross_alpha[self.step].to(probs)
            if bool(alpha.any()):
                base, repl = cond[0], cond[1]
                new = base[..., self.mapper.to(probs.device)] * self.alphas.to(probs) + repl * (1 - self.alphas.to(probs))
                if self.equalizer is not None:
                    new = new * self.equalizer.to(probs)
                cond[1] = new * alpha + (1 - alpha) * repl
        elif self.step < self.self_end and level >= 1:
            cond[1] = cond[0]
        if level >= 1:  # the reference stores maps of <= 32x32 at 512 px
            key = f"{place}_{'cross' if is_cross else 'self'}"
            self.step_store.setdefault(key, []).append(probs[half:])
        return probs

    def between_steps(self) -> None:
        if not self.attention_store:
            self.attention_store = self.step_store
        else:
            for key, maps in self.step_store.items():
                for i, m in enumerate(maps):
                    self.attention_store[key][i] += m
        self.step_store = {}
        self.step += 1

    def local_blend(self, latents: Tensor, step: int) -> Tensor:
        """LocalBlend after step `step`: the level-2 (16x16 at 512 px) cross maps of the down and up
        blocks, summed over all steps so far, mean over layers and heads."""
        if self.words is None or step < self.blend_start:
            return latents
        h, w = latents.shape[-2] >> 2, latents.shape[-1] >> 2
        maps = [m for key in ("down_cross", "up_cross") for m in self.attention_store.get(key, ()) if m.shape[1] == h * w]
        maps = torch.cat([m.reshape(2, -1, h, w, m.shape[-1]) for m in maps], dim=1)  # (2, layers*heads, h, w, 77)
        m = (maps * self.words.to(maps)[:, None, None, None, :]).sum(-1).mean(1, keepdim=True)  # (2, 1, h, w)
        m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=latents.shape[-2:])
        m = m / m.amax(dim=(2, 3), keepdim=True)
        mask = m > self.threshold
        mask = (mask[:1] | mask).to(latents.dtype)
        return latents[:1] + mask * (latents - latents[:1])


class StoringProcessor:
    """A diffusers attention processor that materialises softmax(QK^T) and hands it to the store."""

    def __init__(self, store: P2PStore | None, place: str, level: int) -> None:
        self.store, self.place, self.level = store, place, level

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs: Any) -> Tensor:
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B * heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # (B * heads, N, M): every map, explicitly
        if self.store is not None:
            probs = self.store.edit(probs, attn.heads, is_cross, self.place, self.level)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def storing_processors(unet: Any, store: P2PStore | None) -> dict[str, StoringProcessor]:
    """One processor per attention module, told its place (down/mid/up) and level (0 = full res);
    with store None, plain explicit attention (the offset pass: the same arithmetic as the edit's
    source rows, so that adding the offsets cancels the edit's own z_rec)."""
    n = len(unet.config.block_out_channels)
    procs = {}
    for name in unet.attn_processors:
        block, _, rest = name.partition(".")
        if block == "mid_block":
            place, level = "mid", n - 1
        else:
            index = int(rest.split(".")[0])
            place, level = ("down", index) if block == "down_blocks" else ("up", n - 1 - index)
        procs[name] = StoringProcessor(store, place, level)
    return procs


def default_processor() -> Any:
    """diffusers' own attention (SDPA), which the inversion and the offset pass run with."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def next_step(scheduler: Any, eps: Tensor, t: int, z: Tensor) -> Tensor:
    """The reference's DDIM inversion step from grid point t - ratio to t."""
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    t_prev, t_next = min(t - ratio, 999), t
    ab = scheduler.alphas_cumprod
    a_t = ab[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod
    a_next = ab[t_next]
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


@dataclass
class BaselineResult:
    latents: Tensor  # (2, 4, h, w): source, target
    images: np.ndarray  # (2, H, W, 3) uint8
    trajectory: list[Tensor]  # L[0..S], each (1, 4, h, w)
    timings: dict[str, float]
    rows: dict[str, int]


def _stage(timings: dict[str, float], device: torch.device):
    class Stage:
        def __init__(self, name: str) -> None:
            self.name = name

        def __enter__(self) -> None:
            self.start = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings[self.name] = timings.get(self.name, 0.0) + time.perf_counter() - self.start

    return Stage


@torch.no_grad()
def baseline_edit(b: Baseline, image: np.ndarray, spec: BaselineSpec, ours_tokenizer: Tokenizer,
                  trajectory: list[Tensor] | None = None) -> BaselineResult:
    """One edit of `image` ((H, W, 3) uint8). `trajectory`: start from this DDIM inversion instead
    of inverting (the agreement check edits both sides from one inversion)."""
    timings: dict[str, float] = {}
    stage = _stage(timings, b.device)
    rows: dict[str, int] = {}
    b.unet.set_attn_processor(default_processor())
    sched = b.scheduler
    sched.set_timesteps(spec.steps)
    timesteps = [int(t) for t in sched.timesteps]
    with stage("encode"):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].to(b.device, b.dtype) / 127.5 - 1
        z0 = b.vae.encode(x).latent_dist.mean.float() * b.vae.config.scaling_factor
        ids = b.tokenizer(["", spec.source, spec.target], padding="max_length", max_length=MAX_LENGTH,
                          truncation=True, return_tensors="pt").input_ids.to(b.device)
        null, src, tgt = b.text_encoder(ids).last_hidden_state.split(1)
    with stage("inversion"):
        start = b.rows
        if trajectory is None:
            z, trajectory = z0, [z0]
            for t in reversed(timesteps):
                z = next_step(sched, b.eps(z, torch.tensor(t, device=b.device), src), t, z)
                trajectory.append(z)
        trajectory = [t.to(b.device).float() for t in trajectory]
        offsets, z = [], trajectory[-1]
        pair = torch.cat([null, src])
        b.unet.set_attn_processor(storing_processors(b.unet, None))
        for i, t in enumerate(timesteps):
            e_u, e_c = b.eps(torch.cat([z, z]), torch.tensor(t, device=b.device), pair).chunk(2)
            z_rec = sched.step(e_u + spec.guidance * (e_c - e_u), t, z).prev_sample
            offsets.append(trajectory[-2 - i] - z_rec)
            z = trajectory[-2 - i]
        rows["inversion"] = b.rows - start
    with stage("edit"):
        start = b.rows
        store = P2PStore(ours_tokenizer, spec, len(b.unet.config.block_out_channels))
        b.unet.set_attn_processor(storing_processors(b.unet, store))
        context = torch.cat([null, null, src, tgt])
        latents = trajectory[-1].expand(2, -1, -1, -1).clone()
        for i, t in enumerate(timesteps):
            e_u, e_c = b.eps(torch.cat([latents, latents]), torch.tensor(t, device=b.device), context).chunk(2)
            latents = sched.step(e_u + spec.guidance * (e_c - e_u), t, latents).prev_sample
            store.between_steps()
            latents = torch.cat([latents[:1] + offsets[i], latents[1:]])
            latents = store.local_blend(latents, i)
        b.unet.set_attn_processor(default_processor())
        rows["edit"] = b.rows - start
    with stage("decode"):
        out = b.vae.decode((latents / b.vae.config.scaling_factor).to(b.dtype)).sample.float()
        images = ((out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
    rows["total"] = sum(rows.values())
    return BaselineResult(latents, images, trajectory, timings, rows)
