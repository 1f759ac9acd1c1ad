"""What a network call is told: attention/ResBlock sites, named batch rows, and the controllers.

This is the contract between the networks (ldm/), the controllers (control/) and the sampler
(samplers/), described in docs/architecture.md. The networks hold no per-step state: everything a
controller needs to decide what to do at one attention layer arrives as static `AttnSite` data
(fixed when the UNet is built) plus the per-call `AttnContext` built by the sampler. Nothing is
monkey-patched and nothing is counted: a controller picks layers by querying sites and rows by name.

Controllers compose as a tuple, in order:
- `attend`: the first controller that returns a tensor decides the layer's output; one that returns
  None (an observer, or a rule that does not apply here) passes the call on; if none decides, the
  layer runs plain fused attention.
- `features`, `end_step`: each controller transforms the value the previous one returned.
- `start`, `begin_step`: each controller is told, in order.
The loop drives the lifecycle: `start(run)` before the first step of every run, so a controller
reused for a second image starts clean and can build its row-index tensors once, on the run's device.

Besides the controllers, a call may carry a separate value input for cross-attention (`ValueInput`,
StyleDiffusion's learned values): the layers it selects compute V from it instead of from the text
context, K (and therefore every attention map) still from the text. Without one, nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from kernels.attention import fused_attention

Place = Literal["down", "mid", "up"]
Kind = Literal["self", "cross"]
Role = Literal["source", "target", "reference"]
Branch = Literal["uncond", "cond"]


@dataclass(frozen=True)
class AttnSite:
    """One attention layer of the UNet.

    index: the transformer block's number in execution order (down, mid, up), the `L` the
        reference code derives by counting calls; self and cross attention of a block share it.
    level: resolution level, 0 = full latent resolution (64x64 at 512 px), k = downsampled 2^k.
        Rules stated in 512-px resolutions ("self replacement at <= 32x32") are applied by level,
        so any image size edits the same layers.
    """

    index: int
    place: Place
    level: int
    kind: Kind
    heads: int
    head_dim: int
    name: str  # module path in our state dict, e.g. "input_blocks.1.1.transformer_blocks.0.attn1"


@dataclass(frozen=True)
class ResSite:
    """One ResBlock of the UNet; `block` counts ResBlocks within (place, level) from 0.

    PnP's injection point, diffusers' `up_blocks[1].resnets[1]`, is place "up", the level below
    the lowest-resolution one, block 1.
    """

    index: int  # execution order over all ResBlocks
    place: Place
    level: int
    block: int
    name: str


@dataclass(frozen=True)
class Row:
    role: Role
    branch: Branch


@dataclass(frozen=True)
class BatchLayout:
    """Names for the rows of one batched UNet call.

    The classifier-free-guidance layout puts every unconditional row first, in role order, then
    every conditional row ([u_src, u_tgt, c_src, c_tgt]), the order the references batch in.
    """

    rows: tuple[Row, ...]

    @classmethod
    def cfg(cls, roles: tuple[Role, ...] = ("source", "target")) -> "BatchLayout":
        return cls(tuple(Row(r, "uncond") for r in roles) + tuple(Row(r, "cond") for r in roles))

    def __len__(self) -> int:
        return len(self.rows)

    def without(self, row: Row) -> "BatchLayout":
        """The layout less one row, the others in their order."""
        return BatchLayout(tuple(r for r in self.rows if r != row))

    def index(self, role: Role, branch: Branch) -> int:
        try:
            return self.rows.index(Row(role, branch))
        except ValueError:
            raise KeyError(f"no row ({role}, {branch}) in {self}") from None

    def has(self, role: Role, branch: Branch) -> bool:
        return Row(role, branch) in self.rows

    def indices(self, role: Role) -> list[int]:
        """Rows of one role, in batch order."""
        return [i for i, row in enumerate(self.rows) if row.role == role]

    @property
    def roles(self) -> tuple[Role, ...]:
        """Roles in first-appearance order."""
        seen: list[Role] = []
        for row in self.rows:
            if row.role not in seen:
                seen.append(row.role)
        return tuple(seen)

    @property
    def stepped_roles(self) -> tuple[Role, ...]:
        """Roles the sampler steps, in layout order: every role but "reference" (Plug-and-Play's
        source row, fed from the inversion trajectory). The loop carries one latent per stepped
        role, in this order, and hands that tensor to `Controller.end_step`."""
        return tuple(r for r in self.roles if r != "reference")

    def latent_index(self, role: Role) -> int:
        """Row of `role` in the stepped latents (R, 4, h, w)."""
        return self.stepped_roles.index(role)

    def __str__(self) -> str:
        return "[" + ", ".join(f"{r.branch}/{r.role}" for r in self.rows) + "]"


@dataclass(frozen=True)
class RunInfo:
    """What a controller is told once, before the first step of a sampling run."""

    layout: BatchLayout
    num_steps: int
    device: torch.device
    latent_hw: tuple[int, int]

    def row_index(self, rows: Sequence[int]) -> Tensor:
        """A row list as a long tensor on the run's device, built once per run (on CUDA a list
        handed to the kernel would cost a host-to-device copy on every attention call)."""
        return torch.tensor(list(rows), dtype=torch.long, device=self.device)


@dataclass(frozen=True)
class ValueInput:
    """A separate value input of the cross-attention layers (StyleDiffusion, Li et al. 2023).

    At the cross-attention sites it selects, a layer computes V = to_v(values) instead of
    to_v(context): the keys, and so the attention maps, still come from the text, only what the
    maps average changes. values: (B, 77, C), one row per batch row; a row that keeps its own value
    input carries its text context there. blocks: the transformer blocks (AttnSite.index) whose
    cross-attention takes it; None selects every cross-attention site.
    """

    values: Tensor
    blocks: frozenset[int] | None = None

    def applies(self, site: AttnSite) -> bool:
        return site.kind == "cross" and (self.blocks is None or site.index in self.blocks)


@dataclass(frozen=True)
class AttnContext:
    """Per-UNet-call information, built by the sampler.

    step: denoising step index (0 = first, noisiest); during inversion it counts inversion steps.
    controllers: in composition order (see the module docstring).
    values: a separate value input for cross-attention (ValueInput), or None.
    checkpoint: under autograd, keep only each UNet stage's input and recompute the stage in the
        backward pass (gradient checkpointing: the gradient methods' activation memory drops by
        about two thirds for one more forward pass); no effect without autograd.
    """

    step: int
    timestep: int
    num_steps: int
    layout: BatchLayout
    controllers: tuple["Controller", ...] = ()
    values: ValueInput | None = None
    checkpoint: bool = False

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite) -> Tensor:
        """The layer's output: the first controller's that decides, else plain fused attention."""
        for controller in self.controllers:
            out = controller.attend(q, k, v, site, self)
            if out is not None:
                return out
        return fused_attention(q, k, v)

    def features(self, h: Tensor, site: ResSite) -> Tensor:
        """A ResBlock's residual branch as every controller in turn leaves it."""
        for controller in self.controllers:
            h = controller.features(h, site, self)
        return h


@runtime_checkable
class Controller(Protocol):
    """An attention controller. `control.base.ControllerBase` gives the no-op default of each method."""

    def start(self, run: RunInfo) -> None:
        """Before step 0 of every run: forget earlier runs, precompute what depends on the layout."""
        ...

    def begin_step(self, ctx: AttnContext) -> None: ...

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor | None:
        """q, k, v: (B, heads, N, head_dim) -> the attention output (same layout as q), or None to
        leave this call to the next controller."""
        ...

    def features(self, h: Tensor, site: ResSite, ctx: AttnContext) -> Tensor:
        """The residual branch of a ResBlock, before the skip is added; returns it, maybe edited."""
        ...

    def end_step(self, ctx: AttnContext, latents: Tensor) -> Tensor:
        """Called with the latents after the DDIM step; returns them (LocalBlend edits them)."""
        ...
