"""Sanity checks on a safetensors header before the safetensors library parses the file.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the data. Checking the length and every byte range against the
file size first turns random bytes or a truncated download into one clear error instead of a
parser failure deep inside the library. Shared by model loading and conversion.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ldm.errors import WeightsError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # ComfyUI's bound; real SD headers are ~100 KB
SAFETENSORS_DTYPES = {
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
    "F8_E4M3", "F8_E5M2", "U16", "U32", "U64",
}  # fmt: skip


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Validate the header against the file size; return the parsed header (without __metadata__)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path}: file too short ({size} bytes) to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise WeightsError(
                f"{path}: safetensors header length {n} does not fit the file size {size} (corrupt or truncated)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightsError(f"{path}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    end_max = 0
    for name, info in header.items():
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in SAFETENSORS_DTYPES
            and isinstance(info.get("shape"), list)
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
        )
        if not ok:
            raise WeightsError(f"{path}: safetensors header entry {name!r} is malformed")
        begin, end = info["data_offsets"]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise WeightsError(f"{path}: safetensors entry {name!r} has bad offsets {info['data_offsets']}")
        end_max = max(end_max, end)
    if end_max > data_bytes:
        raise WeightsError(
            f"{path}: truncated safetensors file: tensors need {end_max} data bytes, the file holds {data_bytes}"
        )
    return header
