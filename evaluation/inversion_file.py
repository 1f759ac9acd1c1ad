"""Inversion files: invert once, edit many times (docs/methods/inversion-files.md).

One safetensors file per inversion:
- `trajectory`: (steps+1, 1, 4, h, w) float32, z0 first and z_T last;
- the method's per-step state under the keys `Inversion.state_tensors()` names
  (`null_embeddings` (steps, 1, 77, C) for null-text, `offsets` (steps, 1, 4, h, w) for
  DirectInversion's offset form);
- metadata (strings): format, version, method, its settings (JSON), steps, guidance, the prompt
  the image was inverted with, the image's size and SHA-256, the model.
A file that holds only `trajectory` (no metadata at all, e.g. the reference oracle's DDIM
trajectory) is taken as a plain DDIM inversion: valid for every method whose state derives from
the DDIM trajectory (DDIM, DirectInversion, negative-prompt; null-text re-optimises from it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from inversion.method import InversionMethod, InversionTask
from ldm.errors import UsageError
from ldm.files import atomic_path
from ldm.model import StableDiffusion
from ldm.safetensors_header import check_safetensors_header
from samplers.inversion import Inversion
from samplers.settings import Settings

if TYPE_CHECKING:
    import numpy as np

    from evaluation.api import EditSpec
    from evaluation.registry import Registry

FORMAT = "invedit-inversion"
VERSION = "1"


def save_inversion(path: str | os.PathLike[str], inversion: Inversion, *, prompt: str, guidance: float,
                   info: Mapping[str, Any] | None = None, state_keys: tuple[str, ...] | None = None) -> None:
    """Write `inversion` atomically. state_keys: which state tensors to keep (default: all it has).
    info: extra metadata (image size and hash, model), stored as strings."""
    state = inversion.state_tensors()
    if state_keys is not None:
        state = {k: v for k, v in state.items() if k in state_keys}
    tensors = {"trajectory": torch.stack([z.detach().float().cpu() for z in inversion.trajectory]).contiguous(),
               **{k: v.contiguous() for k, v in state.items()}}
    metadata = {
        "format": FORMAT, "version": VERSION, "method": inversion.method,
        "settings": json.dumps(dict(inversion.settings), default=list), "steps": str(inversion.steps),
        "guidance": repr(float(guidance)), "prompt": prompt,
        **{k: str(v) for k, v in (info or {}).items()},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@dataclass(frozen=True)
class InversionFile:
    """An inversion file as read: the trajectory, the state tensors and the metadata (empty for a
    bare trajectory file)."""

    path: Path
    trajectory: tuple[Tensor, ...]
    state: Mapping[str, Tensor]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.trajectory) - 1

    @property
    def method(self) -> str | None:
        return self.metadata.get("method")

    @property
    def prompt(self) -> str | None:
        return self.metadata.get("prompt")

    @property
    def settings(self) -> dict[str, Any]:
        return json.loads(self.metadata.get("settings", "{}"))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "InversionFile":
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--inversion-file {p}: no such file")
        header = check_safetensors_header(p)
        if "trajectory" not in header:
            raise UsageError(f"--inversion-file {p}: no `trajectory` tensor (keys: {', '.join(sorted(header))})")
        try:
            with safe_open(str(p), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k).float() for k in f.keys()}
        except SafetensorError as err:
            raise UsageError(f"--inversion-file {p} is corrupt: {err}") from None
        if metadata and metadata.get("format") not in (None, FORMAT):
            raise UsageError(f"--inversion-file {p}: format {metadata.get('format')!r} is not an invedit inversion")
        traj = tensors.pop("trajectory")
        if traj.ndim != 5 or traj.shape[1] != 1 or traj.shape[0] < 2:
            raise UsageError(f"--inversion-file {p}: trajectory has shape {tuple(traj.shape)}, expected "
                             "(steps+1, 1, 4, h, w)")
        return cls(p, tuple(z for z in traj), tensors, metadata)  # one (1, 4, h, w) per step


def check_file_prompt(file: InversionFile, prompt: str) -> None:
    """An inversion is only valid for the prompt it was made with (when the file records one)."""
    if file.prompt is not None and file.prompt != prompt:
        raise UsageError(f"--inversion-file {file.path} was inverted with the prompt {file.prompt!r}; this run "
                         f"inverts with {prompt!r}")


def inversion_from_file(sd: StableDiffusion, file: InversionFile, method: InversionMethod, settings: Settings,
                        task: InversionTask, registry: "Registry") -> Inversion:
    """The Inversion `method` would make, from a file instead of from scratch.

    - the file was made by `method` and holds its state: rebuilt from it, no UNet call;
    - else, if `method` starts from the DDIM trajectory and the file holds one (made by such a
      method, or a bare trajectory file): `method` is run on the file's trajectory, which skips the
      DDIM pass (DirectInversion, negative-prompt: no UNet call at all);
    - else a one-line error.
    """
    if file.steps != task.steps:
        raise UsageError(f"--inversion-file {file.path} has {file.steps} steps, this run {task.steps} (--steps)")
    if tuple(file.trajectory[0].shape) != tuple(task.z0.shape):
        raise UsageError(f"--inversion-file {file.path} holds latents {tuple(file.trajectory[0].shape)}, the image "
                         f"gives {tuple(task.z0.shape)} (--size)")
    device_task = task.with_trajectory(tuple(z.to(task.z0.device) for z in file.trajectory))
    state = {k: v.to(task.z0.device) for k, v in file.state.items()}
    if file.method == method.name and method.restore is not None and all(k in state for k in method.state_keys):
        guidance = file.metadata.get("guidance")
        if guidance is not None and float(guidance) != task.guidance:
            # null embeddings and offsets are fitted to one CFG scale; at another they are wrong
            raise UsageError(f"--inversion-file {file.path} was made for guidance {float(guidance):g}; this run uses "
                             f"--guidance {task.guidance:g} (invert again at that scale)")
        return method.restore(device_task, settings, state)
    if file.method == method.name and not method.state_keys:
        return method.invert(sd, device_task, settings)
    if method.ddim_trajectory and file_has_ddim_trajectory(file, registry):
        return method.invert(sd, device_task, settings)
    raise UsageError(f"--inversion-file {file.path} holds a {file.method} inversion; --inversion {method.name} "
                     "cannot start from it (invert again, or edit with --inversion " f"{file.method})")


def file_has_ddim_trajectory(file: InversionFile, registry: "Registry") -> bool:
    """A bare trajectory file, or one made by a method whose trajectory is the plain DDIM inversion."""
    if file.method is None:
        return True
    try:
        return registry.inversion(file.method).method.ddim_trajectory
    except UsageError:
        return False


def edit_inversion_from_file(sd: StableDiffusion, image: "np.ndarray", spec: "EditSpec", file: InversionFile,
                             registry: "Registry") -> Inversion:
    """The inversion `edit(sd, image, spec)` would make, read from `file` (same embeddings as the edit)."""
    from evaluation.api import edit_inputs, inversion_task, plan_edit

    plan = plan_edit(sd, spec)
    check_file_prompt(file, plan.inversion_prompt)
    z0, embeddings = edit_inputs(sd, image, spec, plan)
    task = inversion_task(spec.inversion_spec(plan), z0, embeddings, image=image,
                          target=embeddings[spec.prompts.target])
    return inversion_from_file(sd, file, spec.inversion, spec.inversion_settings, task, registry)
