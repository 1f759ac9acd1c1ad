"""What a benchmark run writes besides the edits: one JSON line per job, and one index.

- RUNS/logs/<run id>-rank<r>.jsonl: each rank appends one line per job as soon as the job ends
  (method, item id, output path, status edited|failed, seed / steps / guidance, seconds per stage,
  UNet row evaluations per stage, whether the DDIM trajectory was computed or shared, the error).
  One file per rank and run, so no two processes ever write the same file. A run killed at any
  moment keeps every line of the jobs it finished.
- RUNS/index.json: written once, by rank 0, after the final gather: the run (command, options,
  versions, per-rank timings), per method the counts of edited / existing / failed outputs, and
  one entry per output (method, item and format). It is merged with the index already there:
  entries of other outputs are kept, and an output this run found already written keeps the
  entry of the run that wrote it. Written atomically, so it is the old index or the new, never
  half.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

from evaluation.outputs import jsonable
from ldm.files import write_json

INDEX = "index.json"
LOGS = "logs"
STATUSES = ("edited", "existing", "failed")


def log_path(runs: Path, run_id: str, rank: int) -> Path:
    return runs / LOGS / f"{run_id}-rank{rank}.jsonl"


class JsonLines:
    """Append-only JSON lines; each line is written and flushed whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(jsonable(record)) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def read_index(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        print(f"warning: {path} is unreadable ({err}); writing a new index", file=sys.stderr)
        return None


def merge_entries(earlier: Iterable[Mapping[str, Any]], current: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per output path (a method's PNG and JPEG of an item are two): this run's, except
    that an output found existing keeps the entry that described its writing. Sorted by method,
    item id, path."""
    merged = {e["path"]: dict(e) for e in earlier}
    for entry in current:
        if entry["status"] != "existing" or entry["path"] not in merged:
            merged[entry["path"]] = dict(entry)
    return sorted(merged.values(), key=lambda e: (e["method"], e["id"], e["path"]))


def counts(entries: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """method -> {edited, existing, failed} entry counts."""
    by_method: dict[str, Counter[str]] = {}
    for e in entries:
        by_method.setdefault(e["method"], Counter())[e["status"]] += 1
    return {m: {s: c[s] for s in STATUSES} for m, c in sorted(by_method.items())}


def write_index(runs: Path, run: Mapping[str, Any], records: Iterable[Mapping[str, Any]]) -> Path:
    """RUNS/index.json from this run's records and the index already there."""
    path = runs / INDEX
    earlier = read_index(path)
    entries = merge_entries((earlier or {}).get("entries", []), records)
    write_json(path, jsonable({**run, "counts": counts(entries), "entries": entries}))
    return path
