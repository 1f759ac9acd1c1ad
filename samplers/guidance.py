"""Classifier-free guidance over named batch rows (Ho & Salimans 2022, eq. 6):
eps = eps_u + w (eps_c - eps_u), docs/methods/README.md ("Guidance").

The loop hands a `Guidance` the unconditional and conditional predictions of every guided role at
once, stacked in role order, with the roles' names, so a rule that looks across roles (ProxEdit's
batch-wide quantile of eps_c - eps_u, samplers/prox.py) or gives each role its own scale
(edit-friendly DDPM's [1, 7.5]) is one more `Guidance` class with the same signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from ldm.context import AttnContext, BatchLayout, Branch, Role
from samplers.noise import cfg


class Guidance(Protocol):
    def combine(self, uncond: Tensor, cond: Tensor, roles: Sequence[Role], ctx: AttnContext) -> Tensor:
        """uncond, cond: (R, C, h, w), one row per guided role, in `roles` order -> guided eps (R, C, h, w)."""
        ...


@runtime_checkable
class PullsBack(Protocol):
    """A guidance that also pulls the stepped latents back toward the inversion trajectory after the
    step (ProxEdit's inversion guidance, samplers/prox.py), from the same predictions."""

    def pull_back(self, uncond: Tensor, cond: Tensor, ctx: AttnContext, latents: Tensor, pivot: Tensor) -> Tensor:
        """uncond, cond: (R, C, h, w) of the guided roles; latents: (R, C, h, w) after the step;
        pivot: (1, C, h, w) the trajectory's latent the step should reach -> the pulled latents."""
        ...


@dataclass(frozen=True)
class ClassifierFree:
    """Plain CFG; `per_role` overrides the scale of some roles (scale 1 returns the conditional
    prediction)."""

    scale: float = 7.5
    per_role: Mapping[Role, float] = field(default_factory=dict)

    def scales(self, roles: Sequence[Role]) -> list[float]:
        return [self.per_role.get(r, self.scale) for r in roles]

    def combine(self, uncond: Tensor, cond: Tensor, roles: Sequence[Role], ctx: AttnContext) -> Tensor:
        scales = self.scales(roles)
        if len(set(scales)) == 1:
            return cfg(uncond, cond, scales[0])
        w = torch.tensor(scales, dtype=uncond.dtype, device=uncond.device).view(-1, 1, 1, 1)  # (R, 1, 1, 1)
        return cfg(uncond, cond, w)


@dataclass(frozen=True)
class RoleScales:
    """Some roles at their own plain CFG scale, the others as `inner` guides them (computed over
    those roles only): edit-friendly's source at 1 beside the edit's target guidance, SPDInv's
    MasaCtrl [1, w] with proximal guidance on the target alone."""

    inner: Guidance
    scales: Mapping[Role, float]

    def combine(self, uncond: Tensor, cond: Tensor, roles: Sequence[Role], ctx: AttnContext) -> Tensor:
        own = [i for i, r in enumerate(roles) if r in self.scales]
        rest = [i for i, r in enumerate(roles) if r not in self.scales]
        out = torch.empty_like(cond)
        if rest:
            out[rest] = self.inner.combine(uncond[rest], cond[rest], [roles[i] for i in rest], ctx)
        if own:
            w = torch.tensor([self.scales[roles[i]] for i in own], dtype=uncond.dtype, device=uncond.device)
            out[own] = cfg(uncond[own], cond[own], w.view(-1, 1, 1, 1))  # (R', 1, 1, 1) per-row scales
        return out


@dataclass(frozen=True)
class GuidedRows:
    """Which layout rows feed each stepped role's noise: computed once per run, not per step, with
    the row indices as tensors on the run's device (a Python list as an index would be copied to
    the device on every step)."""

    roles: tuple[Role, ...]  # the stepped roles, in latent order
    guided: tuple[Role, ...]  # those with both an uncond and a cond row
    uncond_rows: Tensor  # (R',) long: the guided roles' uncond rows
    cond_rows: Tensor  # (R',) long: their cond rows
    single_rows: dict[Role, int]  # roles with one row only: used unguided

    @classmethod
    def of(cls, layout: BatchLayout, device: torch.device | str = "cpu") -> "GuidedRows":
        roles = layout.stepped_roles
        guided = tuple(r for r in roles if layout.has(r, "uncond") and layout.has(r, "cond"))
        single: dict[Role, int] = {}
        for r in roles:
            if r not in guided:
                rows = layout.indices(r)
                if len(rows) != 1:
                    raise ValueError(f"role {r!r} needs an uncond and a cond row or exactly one row in {layout}")
                single[r] = rows[0]

        def index(branch: Branch) -> Tensor:
            return torch.tensor([layout.index(r, branch) for r in guided], dtype=torch.long, device=device)

        return cls(roles, guided, index("uncond"), index("cond"), single)

    def split(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(uncond, cond) predictions of the guided roles, (R', C, h, w) each."""
        return eps.index_select(0, self.uncond_rows), eps.index_select(0, self.cond_rows)

    def eps(self, eps: Tensor, guidance: Guidance, ctx: AttnContext) -> Tensor:
        """The noise prediction of each stepped role, stacked (R, C, h, w); eps has one row per layout row."""
        out: dict[Role, Tensor] = {r: eps[i] for r, i in self.single_rows.items()}
        if self.guided:
            combined = guidance.combine(*self.split(eps), self.guided, ctx)
            out.update(zip(self.guided, combined))
        return torch.stack([out[r] for r in self.roles])
