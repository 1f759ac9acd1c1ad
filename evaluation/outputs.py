"""The one scaffold for what a command writes: an output folder that appears whole or not at all.

`RunDirectory(path)` is checked when it is created, before any weight is loaded (a path that is a
file, or a folder that cannot be written, is a one-line error). Files are written into a hidden
staging folder beside it (`.NAME.partial-XXXX`); `commit(record)` writes run.json last and moves
the staging folder into place, replacing an earlier run's folder only then. So a folder never
mixes two runs and never describes a run it does not hold: a run killed at any moment leaves the
earlier folder untouched (and a hidden staging folder, which is never read). `abandon()` removes
the staging folder; the context manager abandons on an exception.

run.json: the command, every parameter, the metrics, the timings, the input image's original size
and hash, the software versions including the code's own (package version, and the git commit when
run from a checkout), and the finishing time.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.errors import UsageError
from ldm.files import write_json

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_parent(path: Path) -> Path:
    """The folder an output goes into, created; a one-line error when a file stands where a folder
    is needed or the folder cannot be created or written."""
    parent = path.absolute().parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"cannot write the output {path}: {blocker} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot write the output {path}: {err.strerror or err}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the output {path}: its folder {parent} is not writable")
    return parent


class RunDirectory:
    """The output folder of one command run, written as a whole (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.final = Path(path)
        if self.final.exists() and not self.final.is_dir():
            raise UsageError(f"output {self.final} exists and is not a directory")
        parent = make_parent(self.final)
        try:
            self.staging = parent / f".{self.final.name}.partial-{secrets.token_hex(4)}"
            self.staging.mkdir()
        except OSError as err:
            raise UsageError(f"cannot write the output {self.final}: {err.strerror or err}") from None
        self.committed = False

    def path(self, name: str) -> Path:
        """Where to write `name` (may contain subfolders) inside the staging folder."""
        p = self.staging / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def png(self, name: str, image: np.ndarray) -> None:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(self.path(name), format="PNG")

    def npy(self, name: str, value: torch.Tensor | np.ndarray | Sequence[torch.Tensor]) -> None:
        """A tensor, array or list of equal-shape tensors (stacked) as float32 .npy."""
        if isinstance(value, (list, tuple)):
            value = torch.stack([torch.as_tensor(v) for v in value])
        arr = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)
        np.save(self.path(name), arr.astype(np.float32))

    def json(self, name: str, obj: Any) -> None:
        write_json(self.path(name), jsonable(obj))

    def commit(self, record: Mapping[str, Any]) -> Path:
        """Write run.json last, then put the folder in place (replacing an earlier run's)."""
        self.json("run.json", record)
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{secrets.token_hex(4)}"
            os.rename(self.final, old)
        os.rename(self.staging, self.final)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abandon(self) -> None:
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.abandon()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def code_version() -> dict[str, str | None]:
    """The package version and, when run from a git checkout, the commit (with "+dirty" when the
    tracked files differ from it)."""
    out: dict[str, str | None] = {"version": _version("invedit"), "git_commit": None}
    if (REPO_ROOT / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            out["git_commit"] = (commit + ("+dirty" if dirty else "")) or None
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def versions() -> dict[str, Any]:
    """Versions of Python, the runtime packages, the code and the device, for run.json."""
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "invedit": code_version(),
        "torch": torch.__version__,
    }
    for pkg in ("numpy", "pillow", "safetensors", "transformers", "triton"):
        out[pkg] = _version(pkg)
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def jsonable(value: Any) -> Any:
    """JSON-safe copy: tuples to lists, non-finite floats to strings (JSON has no inf/nan)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return str(value)


def run_record(
    command: str,
    params: Mapping[str, Any],
    timings: Mapping[str, float],
    metrics: Mapping[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The content of run.json: command, every parameter, metrics, timings, versions, extra sections."""
    record = {
        "command": command,
        "params": dict(params),
        "metrics": dict(metrics or {}),
        "timings_s": dict(timings),
        **sections,
        "versions": versions(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return jsonable(record)
