"""Classifier-free guidance over named batch rows (Ho & Salimans 2022, eq. 6):
eps = eps_u + w (eps_c - eps_u), ALGORITHMS.md part A §1.4.

The loop hands a `Guidance` the unconditional and conditional predictions of every guided role at
once, stacked in role order, so a rule that looks across roles (ProxEdit's batch-wide quantile of
eps_c - eps_u, part A §5) is one more `Guidance` class with the same signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from ldm.context import AttnContext, BatchLayout, Role


class Guidance(Protocol):
    def combine(self, uncond: Tensor, cond: Tensor, ctx: AttnContext) -> Tensor:
        """uncond, cond: (R, C, h, w), one row per guided role in role order -> guided eps (R, C, h, w)."""
        ...


@dataclass(frozen=True)
class ClassifierFree:
    """Plain CFG with one scale for every role; scale 1 returns the conditional prediction."""

    scale: float = 7.5

    def combine(self, uncond: Tensor, cond: Tensor, ctx: AttnContext) -> Tensor:
        return uncond + self.scale * (cond - uncond)


def guided_eps(
    eps: Tensor, layout: BatchLayout, roles: Sequence[Role], guidance: Guidance, ctx: AttnContext
) -> Tensor:
    """The noise prediction of each role in `roles`, stacked (len(roles), C, h, w).

    eps holds one row per layout row. Roles with both an uncond and a cond row are combined by
    `guidance` (all in one call); a role with only one row uses it unguided.
    """
    guided = [r for r in roles if layout.has(r, "uncond") and layout.has(r, "cond")]
    out: list[Tensor | None] = [None] * len(roles)
    if guided:
        u = eps[[layout.index(r, "uncond") for r in guided]]  # (G, C, h, w)
        c = eps[[layout.index(r, "cond") for r in guided]]
        combined = guidance.combine(u, c, ctx)
        for j, r in enumerate(guided):
            out[roles.index(r)] = combined[j]
    for i, r in enumerate(roles):
        if out[i] is None:
            rows = layout.indices(r)
            if len(rows) != 1:
                raise ValueError(f"role {r!r} needs an uncond and a cond row or exactly one row in {layout}")
            out[i] = eps[rows[0]]
    return torch.stack(out)  # type: ignore[arg-type]
