"""Read an untrusted checkpoint file into a flat {name: tensor} dict without running its code.

docs/weights.md, "Safe loading". The format is sniffed from the bytes, not the extension:
- safetensors: the 8-byte header length and the JSON header are checked against the file size
  before safetensors parses anything (a random or truncated file is refused with what was wrong);
- PyTorch zip / legacy pickles: `torch.load(weights_only=True)` inside a scoped allow-list of
  inert stand-ins for the few non-tensor globals old Lightning checkpoints carry (the callback
  class used as a dict key, numpy scalars such as `best_model_score`). The stand-ins rebuild
  nothing: the metadata they carry is never needed. Anything else the pickle asks for is refused
  with the global's name; there is no fallback to `weights_only=False`.
Nested `state_dict` wrappers are unwrapped and only tensor values are kept.
"""

from __future__ import annotations

import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.errors import WeightsError
from ldm.safetensors_header import check_safetensors_header


class _LightningCallbackStandIn:
    """Takes the place of pytorch_lightning's ModelCheckpoint (a dict key in `callbacks`)."""

    def __setstate__(self, state: Any) -> None:  # callback state is never used
        pass


class _NumpyDtypeStandIn:
    """Takes the place of numpy.dtype / numpy.dtypes.Float64DType inside numpy-scalar pickles."""

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _numpy_scalar_stand_in(*args: Any) -> None:
    """numpy.core.multiarray.scalar: the scalar's value (callback metadata) is dropped."""


def _codecs_encode_stand_in(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """_codecs.encode as protocol-2 pickles use it to carry bytes: str -> bytes, nothing else."""
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise TypeError("only str -> bytes encoding is allowed")
    return text.encode(encoding, errors)


# (object, global name in the pickle). numpy 2 writes `numpy._core`, numpy 1 `numpy.core`.
STAND_INS: list[tuple[Any, str]] = [
    (_LightningCallbackStandIn, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_numpy_scalar_stand_in, "numpy.core.multiarray.scalar"),
    (_numpy_scalar_stand_in, "numpy._core.multiarray.scalar"),
    (_NumpyDtypeStandIn, "numpy.dtype"),
    (_NumpyDtypeStandIn, "numpy.dtypes.Float64DType"),
    (_codecs_encode_stand_in, "_codecs.encode"),
]


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch-zip', 'torch-legacy' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode, as torch's legacy format writes
        return "torch-legacy"
    return "unknown"


def _load_safetensors(path: Path, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    from safetensors import safe_open

    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except Exception as err:  # any parse failure means a corrupt file
        raise WeightsError(f"{path}: cannot read safetensors file ({err})") from None


def pickle_globals(path: Path, limit: int = 10_000) -> list[str]:
    """The globals ("module.name") a plain pickle file imports, read from its opcodes without
    unpickling anything (pickletools only parses), for naming what is refused."""
    found: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for n, (op, arg, _) in enumerate(pickletools.genops(f)):
                if n > limit:
                    break
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name == "GLOBAL" and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a malformed pickle: what was found so far
        pass
    return list(dict.fromkeys(found))


def _refuse_pickle(path: Path, needs: str) -> WeightsError:
    return WeightsError(f"{path}: refusing to unpickle: the file needs {needs}, which is not tensor data; "
                        "only weights are loaded from pickles (convert the file to safetensors with a tool you trust)")


def _load_pickle(path: Path, zip_format: bool) -> Any:
    try:
        with torch.serialization.safe_globals(STAND_INS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol warning: our one line says it all
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except Exception as err:  # torch raises several types; classified by message below
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"unrecognized function (\S+)", text)
        if found:
            raise _refuse_pickle(path, found.group(1)) from None
        if "Unsupported" in text or "Can only" in text:
            # torch's message advises weights_only=False, which must never be done with an untrusted
            # file: name the opcode or the globals instead
            names = [] if zip_format else pickle_globals(path)
            if names:
                raise _refuse_pickle(path, ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
                                     + " (a plain pickle, not the format torch.save writes)") from None
            what = re.search(r"Unsupported operand \d+|Can only [^\n.]*", text)
            detail = what.group(0) if what else "an instruction the safe loader does not read"
            raise WeightsError(f"{path}: refusing to unpickle: {detail}; only weights are loaded from pickles "
                               "(convert the file to safetensors with a tool you trust)") from None
        reason = "truncated or corrupt PyTorch checkpoint" if zip_format else "not a readable PyTorch checkpoint"
        raise WeightsError(f"{path}: {reason} ({text.splitlines()[0] if text else type(err).__name__})") from None


def unwrap(obj: Any) -> dict[str, Tensor]:
    """Descend through `state_dict` wrappers and keep the tensor values (docs/weights.md, "Safe loading")."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def read_state_dict(path: str | Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, Tensor]:
    """The tensors of one checkpoint file whose names pass `keep`, loaded without executing code
    from it. safetensors files read only those tensors; zip pickles are memory-mapped, so tensors
    that are dropped are never read either."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint file {path} does not exist")
    kind = sniff_format(path)
    if kind == "safetensors":
        return _load_safetensors(path, keep)
    if kind == "torch-zip":
        if not zipfile.is_zipfile(path):
            raise WeightsError(f"{path}: truncated or corrupt PyTorch checkpoint (zip directory unreadable)")
        return {k: v for k, v in unwrap(_load_pickle(path, zip_format=True)).items() if keep(k)}
    if kind == "torch-legacy":
        return {k: v for k, v in unwrap(_load_pickle(path, zip_format=False)).items() if keep(k)}
    raise WeightsError(
        f"{path}: unrecognised file format: expected a .safetensors file or a PyTorch checkpoint (.ckpt/.bin/.pt)"
    )
