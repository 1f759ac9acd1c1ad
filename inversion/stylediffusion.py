"""StyleDiffusion inversion (Li et al., "StyleDiffusion: Prompt-Embedding Inversion for Text-Based
Editing", 2023; docs/methods/stylediffusion.md).

Like null-text inversion it keeps the guidance-1 DDIM trajectory L as pivots and optimises, per
denoising step, something that makes one CFG step land on the pivot; what it optimises is a small
mapping network M_i that turns the photo's CLIP image tokens into the *value* input of every
cross-attention layer of the conditional branch (the keys, hence the maps, stay the text's):

    V = to_v(c * a_i + b_i),  (a_i, b_i) = M_i(CLIP tokens),  c = E(src)

minimising, at step i (timestep t_i, reconstruction z_i),

    ||ddim_step(z_i, eps_u + w (eps_c[M_i] - eps_u)) - L[-2-i]||^2 / n
      + sum over the 16x16-at-512 cross-attention sites of the down and up blocks
        of mean (A[M_i] - A*)^2       (the paper's attention regularisation)

As the reference (cure-lab/PnPInversion `models/stylediffusion/inversion.py`, `utils.py`):
- M_i: Conv1d(T -> 154) over the tokens, one [Conv1d(154 -> 154), BatchNorm1d (batch statistics,
  the reference never leaves training mode), LeakyReLU] block, Conv1d(154 -> 154); the 154 rows
  are a_i (first 77) and b_i (last 77), each over the CLIP width (= the UNet's context width);
- ceil(100 e^{-0.1 i}) Adam rounds at step i (1071 over 50 steps), a fresh Adam with lr
  0.01 (1 - i/100), warm start from M_{i-1}, stop once the loss of a round (computed before its
  update, the update kept) is below 1e-5 + 2e-5 i; eps_u = eps(z_i, E("")) once per step; after
  the rounds z_{i+1} is the CFG step with the final M_i;
- A*: the maps the DDIM inversion recorded for the call that read the same latent L[T-i]
  (timestep label t_{i-1}); step 0's latent L[T] was never fed to the UNet and reuses the last
  inversion call's maps, as the reference's A*(T) = A*(T-1).
The editing loop then feeds a_i, b_i (samplers.inversion.ValueModulation) to the cond rows.

Only M_i receives gradients: the UNet is frozen for the duration (samplers.noise.frozen_weights),
the CLIP encoder is frozen and runs once.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from control.base import SiteRule
from control.record import CallMaps
from inversion.ddim import ddim_trajectory, trajectory_cost
from inversion.image_tokens import DEFAULT_CLIP_VISION, load_image_tokens
from inversion.method import InversionMethod, InversionTask
from ldm.context import AttnContext, BatchLayout, Row, ValueInput
from ldm.errors import UsageError, WeightsError
from ldm.model import StableDiffusion
from ldm.tokenizer import MAX_LENGTH
from samplers.ddim import ddim_step
from samplers.inversion import Inversion, InversionCost, ValueModulation
from samplers.noise import cfg, frozen_weights, predict_noise
from samplers.schedule import Schedule
from samplers.settings import Alias, Settings, setting

COND = BatchLayout((Row("source", "cond"),))


@dataclass(frozen=True)
class StyleDiffusionSettings(Settings):
    """The reference's PIE-Bench run (run_editing_stylediffusion.py): 100 rounds decaying as e^{-0.1 i}."""

    inner_steps: int = setting(100, "Adam rounds at step 0; step i gets ceil(N e^(-decay i))", flag="--sd-inner-steps", low=1)
    decay: float = setting(0.1, "decay rate of the rounds per step", flag="--sd-decay", low=0.0)
    lr: float = setting(1e-2, "Adam learning rate at step 0, decayed as lr (1 - i/100)", flag="--sd-lr", low=0.0)
    early_stop: float = setting(1e-5, "stop a step's rounds below this loss (+ the slope x step)", flag="--sd-early-stop",
                                low=0.0)
    early_stop_slope: float = setting(2e-5, "per-step growth of the early-stop threshold", flag="--sd-early-stop-slope",
                                      low=0.0)
    epochs: int = setting(1, "passes over all steps (later passes continue each step's own network)", flag="--sd-epochs",
                          low=1)
    attn_level: int = setting(2, "UNet level of the cross-attention maps kept close to the inversion's (2 = 16x16 at 512 px)",
                              flag="--sd-attn-level", low=0)
    blocks: int = setting(1, "[Conv1d, BatchNorm, LeakyReLU] blocks of each mapping network", flag="--sd-blocks", low=0)
    checkpoint: bool = setting(False, "gradient checkpointing of the UNet in the backward passes (about two thirds "
                               "less activation memory, one more forward pass per round)", flag="--sd-checkpoint")
    clip_vision: str = setting(DEFAULT_CLIP_VISION, "CLIP vision model: a transformers folder or a hub id in the "
                               "Hugging Face cache (the reference uses OpenAI's ViT-B/16)", metavar="FOLDER")


class ValueMapping(nn.Module):
    """M_i: CLIP tokens (1, T, D) -> (a, b), each (1, 77, D). Conv1d with kernel 1 over the token axis
    (the tokens are the channels, the D features the length), as the reference."""

    def __init__(self, tokens: int, blocks: int = 1) -> None:
        super().__init__()
        rows = 2 * MAX_LENGTH  # a and b
        # constructed in the reference's order (the block it deep-copies first), so a seed draws alike
        block = nn.Sequential(nn.Conv1d(rows, rows, 1), nn.BatchNorm1d(rows, track_running_stats=False), nn.LeakyReLU())
        self.conv_start = nn.Conv1d(tokens, rows, 1)
        self.conv_block = nn.Sequential(*[copy.deepcopy(block) for _ in range(blocks)])
        self.conv_end = nn.Conv1d(rows, rows, 1)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv_end(self.conv_block(self.conv_start(tokens)))  # (1, 154, D)
        return h[:, :MAX_LENGTH], h[:, MAX_LENGTH:]


def rounds_schedule(inner_steps: int, decay: float, steps: int) -> tuple[int, ...]:
    """ceil(N e^{-decay i}) for i = 0..steps-1: 100, 91, 82, ... (1071 in all for 50 steps)."""
    return tuple(int(math.ceil(inner_steps * math.exp(-decay * i))) for i in range(steps))


def modulate(context: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """The value input of a cond row: c * a + b (the reference's forward_embed)."""
    return context.float() * scale + shift


def _maps_loss(maps: Mapping[int, Tensor], reference: Mapping[int, Tensor]) -> Tensor:
    """sum over sites of mean((A - A*)^2), the reference's attention term."""
    return sum((F.mse_loss(maps[s], reference[s]) for s in reference), torch.zeros((), device=next(iter(maps.values())).device))


def invert_stylediffusion(sd: StableDiffusion, task: InversionTask,
                          settings: StyleDiffusionSettings = StyleDiffusionSettings()) -> Inversion:
    if task.image is None:
        raise UsageError("StyleDiffusion encodes the photo itself: the inversion needs the image's pixels")
    context_dim = sd.unet.config.context_dim
    encoder = load_image_tokens(settings.clip_vision, task.z0.device)
    if encoder.width != context_dim:
        raise WeightsError(f"--clip-vision {settings.clip_vision}: its width {encoder.width} is not the UNet's context "
                           f"width {context_dim} (StyleDiffusion maps CLIP tokens onto text embeddings; SD-1.x and "
                           "ViT-B/16 are both 768)")
    tokens = encoder(task.image)  # (1, T, D), once: the reference re-encodes the same photo at every call
    trajectory = ddim_trajectory(sd, task)
    schedule = task.schedule
    steps = task.steps
    plan = rounds_schedule(settings.inner_steps, settings.decay, steps)
    rule = SiteRule(kind="cross", places=("down", "up"), min_level=settings.attn_level, max_level=settings.attn_level)
    if not any(rule.matches(s) for s in sd.unet.attn_sites()):
        raise UsageError(f"--sd-attn-level {settings.attn_level}: this UNet has no down/up cross-attention at that level")
    null, src = task.null.float(), task.prompt.float()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.seed)
        net = ValueMapping(encoder.count, settings.blocks).to(task.z0.device)
    states: list[dict[str, Tensor] | None] = [None] * steps
    scales: list[Tensor] = [torch.empty(0)] * steps
    shifts: list[Tensor] = [torch.empty(0)] * steps
    losses: list[tuple[float, ...]] = []
    forward_rows = 0
    recorder = CallMaps(rule)
    started = time.perf_counter()
    bar = tqdm(total=sum(plan) * settings.epochs, desc="StyleDiffusion", disable=not task.progress, leave=False)
    with frozen_weights(sd):
        for epoch in range(settings.epochs):
            z = trajectory[-1]
            for i, t in enumerate(schedule.timesteps):
                state = states[i] if epoch > 0 else (states[i - 1] if i > 0 else None)
                if state is not None:
                    net.load_state_dict(state)  # warm start from the previous step (first pass) or itself
                reference = _inversion_maps(sd, trajectory, i, src, schedule, recorder)
                with torch.no_grad():
                    e_u = predict_noise(sd, z, t, null)
                step_losses = _fit_step(sd, net, tokens, z, i, t, e_u, src, trajectory[-2 - i], reference, recorder,
                                        plan[i], schedule, task.guidance, settings, bar)
                losses.append(step_losses)
                bar.update(plan[i] - len(step_losses))  # rounds skipped by the early stop
                states[i] = {k: v.detach().clone() for k, v in net.state_dict().items()}
                with torch.no_grad():
                    scale, shift = net(tokens)
                    e_c = predict_noise(sd, z, t, src, _value_context(i, t, steps, src, scale, shift))
                    z = ddim_step(z, cfg(e_u, e_c, task.guidance), t, schedule)
                scales[i], shifts[i] = scale.detach(), shift.detach()
                forward_rows += 1 + 1 + len(step_losses) + 1  # A*, eps_u, the rounds, the final eps_c
    bar.close()
    rounds = tuple(len(l) for l in losses)
    cost = trajectory_cost(task) + InversionCost(unet_rows=forward_rows, unet_rows_backward=sum(rounds),
                                                 rounds_per_step=rounds, seconds=time.perf_counter() - started)
    return Inversion("stylediffusion", trajectory, values=ValueModulation(tuple(scales), tuple(shifts)),
                     settings=settings.as_dict(), cost=cost, losses=tuple(losses))


def _value_context(i: int, t: int, steps: int, src: Tensor, scale: Tensor, shift: Tensor, *,
                   controllers: tuple[CallMaps, ...] = (), checkpoint: bool = False) -> AttnContext:
    """The conditional call of step i with the mapped value input on every cross-attention site."""
    return AttnContext(i, t, steps, COND, controllers, values=ValueInput(modulate(src, scale, shift)),
                       checkpoint=checkpoint)


@torch.no_grad()
def _inversion_maps(sd: StableDiffusion, trajectory: tuple[Tensor, ...], i: int, src: Tensor, schedule: Schedule,
                    recorder: CallMaps) -> dict[int, Tensor]:
    """A* for denoising step i: the maps of the inversion call that read L[T-i] (label t_{i-1});
    for i = 0, the last inversion call's (L[T-1], label t_0). One conditional row, recomputed here
    rather than kept for every step (3.9 MiB a step at 512 px)."""
    steps = schedule.steps
    k = min(steps - i, steps - 1)  # inversion step k read L[k] at label t_{steps-1-k}
    t = schedule.timesteps[steps - 1 - k]
    recorder.clear()
    predict_noise(sd, trajectory[k], t, src, AttnContext(i, t, steps, COND, (recorder,)))
    return {s: m[0] for s, m in recorder.maps.items()}  # (heads, N, 77) per site


def _fit_step(sd: StableDiffusion, net: ValueMapping, tokens: Tensor, z: Tensor, i: int, t: int, e_u: Tensor, src: Tensor,
              pivot: Tensor, reference: Mapping[int, Tensor], recorder: CallMaps, rounds: int, schedule: Schedule,
              guidance: float, settings: StyleDiffusionSettings, bar: tqdm) -> tuple[float, ...]:
    """The Adam rounds of step i on M_i; returns the loss of each round (before its update)."""
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr * (1.0 - i / 100.0))  # fresh moments every step
    threshold = settings.early_stop + i * settings.early_stop_slope
    losses: list[float] = []
    for _ in range(rounds):
        scale, shift = net(tokens)
        recorder.clear()
        ctx = _value_context(i, t, schedule.steps, src, scale, shift, controllers=(recorder,), checkpoint=settings.checkpoint)
        e_c = predict_noise(sd, z, t, src, ctx)
        latent_loss = F.mse_loss(ddim_step(z, cfg(e_u, e_c, guidance), t, schedule), pivot)
        loss = latent_loss + _maps_loss({s: m[0] for s, m in recorder.maps.items()}, reference)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(step=i, loss=f"{losses[-1]:.3g}")
        bar.update()
        # tested after the update, with the loss from before it: the updated M_i is kept
        if losses[-1] < threshold:
            break
    recorder.clear()
    return tuple(losses)


def restore_stylediffusion(task: InversionTask, settings: StyleDiffusionSettings, state: Mapping[str, Tensor]) -> Inversion:
    """From a file: the trajectory and the per-step value modulation (the networks' outputs on the
    photo, which is all the editing loop reads of them)."""
    assert task.trajectory is not None
    values = ValueModulation(tuple(a for a in state["value_scale"]), tuple(b for b in state["value_shift"]))
    return Inversion("stylediffusion", task.trajectory, values=values, settings=settings.as_dict())


METHOD = InversionMethod(
    name="stylediffusion",
    summary="StyleDiffusion: per-step mapping networks turn the photo's CLIP tokens into the cross-attention values, "
            "trained onto the DDIM pivots (Adam, ceil(100 e^-0.1i) rounds)",
    settings=StyleDiffusionSettings,
    invert=invert_stylediffusion,
    aliases=(Alias("style-diffusion"),),
    state_keys=("value_scale", "value_shift"),
    restore=restore_stylediffusion,
)
