"""Atomic file output: write to a temporary name in the target directory, then rename.

A reader (or a resumed run) never sees a half-written file: either the old content or the new.
Temporary files are created with mode 0666 minus the umask, the permissions a plain `open(path,
"w")` gives, so results are readable by others exactly when ordinary files would be (tempfile's
0600 would not be). This lives in ldm/, the bottom of the stack, because the tokenizer writes its
vocabulary files through it as well as every command above.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator


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


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
