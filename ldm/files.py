"""Atomic file output: write to a temporary name in the target directory, then rename.

A reader (or a resumed run) never sees a half-written file: either the old content or the new.
Temporary files are created with mode 0666 minus the umask, the permissions a plain `open(path,
"w")` gives, so results are readable by others exactly when ordinary files would be (tempfile's
0600 would not be). This lives in ldm/, the bottom of the stack, because the tokenizer writes its
vocabulary files through it as well as every command above.

A process killed between creating the temporary file and the rename (SIGKILL, power loss) leaves
the temporary behind, never the target; `leftover_temps(path)` finds such files of a target so a
resumed run can remove them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterator


TEMP_TAG = re.compile(r"[0-9a-f]{8}")  # the random part of a temporary name, as _create_temp makes it

def _create_temp(directory: Path, name: str) -> Path:
    """A new empty file `.NAME.<random>.tmp` in `directory`, mode 0666 & ~umask."""
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(target.parent, target.name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def leftover_temps(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary files `atomic_path(path)` created and never renamed (their writer was killed).
    Only call this when no other process is writing `path`: its temporary looks the same."""
    target = Path(path)
    prefix, suffix = f".{target.name}.", ".tmp"
    try:
        names = [entry.name for entry in os.scandir(target.parent)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(target.parent / n for n in names if n.startswith(prefix) and n.endswith(suffix)
                  and TEMP_TAG.fullmatch(n[len(prefix):-len(suffix)]))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
