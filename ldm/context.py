"""What a network call is told: attention/ResBlock sites, named batch rows, and the controller.

This is the contract between the networks (ldm/), the controllers (control/) and the sampler
(samplers/), DESIGN.md §5. The networks hold no per-step state: everything a controller needs to
decide what to do at one attention layer arrives as static `AttnSite` data (fixed when the UNet is
built) plus the per-call `AttnContext` built by the sampler. Nothing is monkey-patched and nothing
is counted: a controller picks layers by querying sites and rows by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

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
class AttnContext:
    """Per-UNet-call information, built by the sampler.

    step: denoising step index (0 = first, noisiest); during inversion it counts inversion steps.
    """

    step: int
    timestep: int
    num_steps: int
    layout: BatchLayout
    controller: "Controller"


@runtime_checkable
class Controller(Protocol):
    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor:
        """q, k, v: (B, heads, N, head_dim) -> attention output of the same layout as q."""
        ...

    def features(self, h: Tensor, site: ResSite, ctx: AttnContext) -> Tensor:
        """The residual branch of a ResBlock, before the skip is added; returns it, maybe edited."""
        ...

    def begin_step(self, ctx: AttnContext) -> None: ...

    def end_step(self, ctx: AttnContext, latents: Tensor) -> Tensor:
        """Called with the latents after the DDIM step; returns them (LocalBlend edits them)."""
        ...

    def reset(self) -> None: ...


class NoControl:
    """Plain attention, untouched features: the behaviour of an uncontrolled UNet."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor:
        return fused_attention(q, k, v)

    def features(self, h: Tensor, site: ResSite, ctx: AttnContext) -> Tensor:
        return h

    def begin_step(self, ctx: AttnContext) -> None:
        pass

    def end_step(self, ctx: AttnContext, latents: Tensor) -> Tensor:
        return latents

    def reset(self) -> None:
        pass
