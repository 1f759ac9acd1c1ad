"""PIE-Bench (and the TI2I set beside it) as a list of items an editor or a scorer can use.

PIE-Bench (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code",
arXiv 2310.01506) is a folder ROOT with `annotation_images/` (700 photos, one folder per editing
type, e.g. `1_change_object_80/1_artificial/1_animal/111000000000.jpg`) and `mapping_file.json`,
one JSON object keyed by a 12-digit id whose entries hold the image path (relative to
`annotation_images/`), the source and target prompts with the changed words in [ ], an
instruction, the editing type "0".."9", the blend words "<source word> <target word>" and the
edit mask as (start, length) runs (masks.py). The TI2I set of Plug-and-Play (55 photos with 1-5
target prompts each) ships beside it as `mapping_file_ti2i_benchmark.json`: only image path,
an empty source prompt and the target prompt, its paths written from the reference repository's
root (`data/annotation_images/ti2i_benchmark/...`).

Prompts are cleaned exactly as cure-lab/PnPInversion does (evaluation/evaluate.py,
run_editing_p2p.py): every "[" and "]" is deleted and nothing else changes (double spaces stay;
control/words.py normalises whitespace later, for the word lookup of the editors).
Blend words are `blended_word.split(" ")`, the first two used, as run_editing_p2p.py does.

A missing root or an unreadable mapping file is a DataError. A malformed entry (a missing or
mistyped field, a missing image, an undecodable mask, a path leaving the folder) is a DataError
naming the item, or with skip_bad=True a line in `Dataset.skipped` and the item left out. With a
types filter, entries of other types are passed over unread, as the reference's loop does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Collection, Literal

import numpy as np

from evaluation.pie.masks import MASK_SHAPE, decode_mask
from ldm.errors import DataError, UsageError

IMAGES_DIR = "annotation_images"
MAPPING_FILES = {"pie": "mapping_file.json", "ti2i": "mapping_file_ti2i_benchmark.json"}
Kind = Literal["pie", "ti2i"]

# editing_type_id -> name, as the folders of annotation_images/ are named (README of the reference)
EDITING_TYPES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change attribute (content)",
    "5": "change attribute (pose)",
    "6": "change attribute (color)",
    "7": "change attribute (material)",
    "8": "change background",
    "9": "change style",
}


@dataclass(frozen=True, eq=False)
class PieItem:
    """One benchmark entry, everything an editor and a scorer need.

    `relative_path` is the image's path below annotation_images/ (posix), `image_path` the file.
    `output_name` is where its edits go below RUNS/<method>/annotation_images/ (layout.py): the
    relative path itself for PIE-Bench, as the reference lays out its outputs; for TI2I, where
    several prompts share one photo, the item id is added to the file name (horse.jpg -> horse_3.jpg).
    """

    id: str
    relative_path: str
    image_path: Path
    output_name: str
    source_prompt: str  # brackets removed
    target_prompt: str  # brackets removed
    instruction: str
    editing_type: str | None  # "0".."9"; None for TI2I
    blend_words: tuple[str, str] | None  # (source word, target word) for Prompt-to-Prompt's LocalBlend
    mask_runs: tuple[int, ...] | None  # the file's (start, length) list; None where the set has no masks

    def mask(self) -> np.ndarray | None:
        """(512, 512) bool, True = region to edit, border forced True; None for TI2I."""
        return None if self.mask_runs is None else decode_mask(self.mask_runs, MASK_SHAPE)


@dataclass(frozen=True)
class Dataset:
    root: Path
    kind: Kind
    items: tuple[PieItem, ...]
    skipped: tuple[str, ...]  # one line per entry left out with skip_bad, naming it and why


def clean_prompt(prompt: str) -> str:
    """The reference's cleaning: delete the [ ] diff markers, change nothing else."""
    return prompt.replace("[", "").replace("]", "")


def check_types(types: Collection[str] | None) -> tuple[str, ...] | None:
    """Validate editing-type ids given by the user ("0".."9")."""
    if types is None:
        return None
    unknown = [t for t in types if t not in EDITING_TYPES]
    if unknown:
        raise UsageError(f"unknown editing type {unknown[0]!r}; choose from {' '.join(EDITING_TYPES)}")
    return tuple(dict.fromkeys(types))


def load_dataset(
    root: str | Path, kind: Kind = "pie", *, types: Collection[str] | None = None, skip_bad: bool = False
) -> Dataset:
    """Read ROOT/<mapping file> into items, in the file's order, keeping only `types` if given."""
    root = Path(root)
    wanted = check_types(types)
    if kind not in MAPPING_FILES:
        raise UsageError(f"unknown benchmark set {kind!r}; choose from {', '.join(MAPPING_FILES)}")
    if wanted is not None and kind == "ti2i":
        raise UsageError("the TI2I set has no editing types; leave out --types")
    if not root.is_dir():
        raise DataError(f"{root}: no such benchmark folder (expected {IMAGES_DIR}/ and {MAPPING_FILES[kind]} inside)")
    mapping_path = root / MAPPING_FILES[kind]
    entries = _read_mapping(mapping_path)
    items: list[PieItem] = []
    skipped: list[str] = []
    for key, entry in entries.items():
        if wanted is not None and isinstance(entry, dict) and entry.get("editing_type_id") not in wanted:
            continue  # like the reference, entries of other types are not read, so not checked
        try:
            item = _item(root, kind, key, entry)
        except DataError as err:
            message = f"{mapping_path.name}: item {key}: {err}"
            if not skip_bad:
                raise DataError(f"{message} (--skip-bad leaves such items out)") from None
            skipped.append(message)
            continue
        items.append(item)
    return Dataset(root, kind, tuple(items), tuple(skipped))


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: no mapping file")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(entries, dict):
        raise DataError(f"{path}: expected one JSON object keyed by item id, found a {type(entries).__name__}")
    return entries


def _field(entry: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    if name not in entry:
        if default is not None:
            return default
        raise DataError(f"missing field {name!r}")
    value = entry[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"field {name!r} is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def _relative_image_path(text: str) -> str:
    """The path below annotation_images/. TI2I entries are written from the reference repository's
    root (data/annotation_images/...): everything up to the last annotation_images/ is dropped."""
    path = PurePosixPath(text.replace("\\", "/"))
    if IMAGES_DIR in path.parts:
        parts = path.parts
        path = PurePosixPath(*parts[len(parts) - parts[::-1].index(IMAGES_DIR):])
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DataError(f"image_path {text!r} must be a relative path inside {IMAGES_DIR}/")
    return path.as_posix()


def _item(root: Path, kind: Kind, key: str, entry: Any) -> PieItem:
    if not isinstance(entry, dict):
        raise DataError(f"entry is a {type(entry).__name__}, expected an object")
    relative = _relative_image_path(_field(entry, "image_path", str))
    image_path = root / IMAGES_DIR / relative
    if not image_path.is_file():
        raise DataError(f"image {image_path} is missing")
    target = clean_prompt(_field(entry, "editing_prompt", str))
    if kind == "ti2i":
        # several prompts per photo: the id keeps their outputs apart
        rel = PurePosixPath(relative)
        return PieItem(
            id=key, relative_path=relative, image_path=image_path,
            output_name=rel.with_name(f"{rel.stem}_{key}{rel.suffix}").as_posix(),
            source_prompt=clean_prompt(_field(entry, "original_prompt", str, "")), target_prompt=target,
            instruction=_field(entry, "editing_instruction", str, ""), editing_type=None, blend_words=None,
            mask_runs=None,
        )
    editing_type = _field(entry, "editing_type_id", str)
    if editing_type not in EDITING_TYPES:
        raise DataError(f"editing_type_id {editing_type!r} is not one of {' '.join(EDITING_TYPES)}")
    blend = _field(entry, "blended_word", str)
    words = blend.split(" ") if blend != "" else []
    if words and len(words) < 2:
        raise DataError(f"blended_word {blend!r}: expected '<source word> <target word>' or ''")
    mask_runs = _field(entry, "mask", list)
    decode_mask(mask_runs)  # a bad mask fails now, naming its item, not in the middle of a run
    return PieItem(
        id=key, relative_path=relative, image_path=image_path, output_name=relative,
        source_prompt=clean_prompt(_field(entry, "original_prompt", str)), target_prompt=target,
        instruction=_field(entry, "editing_instruction", str, ""), editing_type=editing_type,
        blend_words=(words[0], words[1]) if words else None, mask_runs=tuple(mask_runs),
    )
