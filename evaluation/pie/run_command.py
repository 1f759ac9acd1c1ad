"""`invedit eval run`: edit PIE-Bench with inversion x editing methods, into the layout the scorer reads.

    invedit eval run --model DIR --data ROOT --methods directinversion+p2p ddim+p2p -o RUNS
    torchrun --nproc-per-node 8 --no-python invedit eval run ...      # one rank per GPU

Methods are named as the reference names them (`invedit methods`); each method's edit of an item
goes to RUNS/<method>/annotation_images/<the item's path> (.png; with --format jpeg the reference's
4-panel strip at its .jpg name). The model loads once per process; the runner's per-item settings,
the sharing of DDIM trajectories and resuming are described in runner.py, the logs and the index
in run_log.py, the ranks in world.py; docs/evaluation.md is the user's page.

Exit status: 0 when every job edited or found its output, 1 when some failed (their errors are in
the logs and the index; the others ran), 2 for a user error before the run.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from evaluation.commands.common import check_run_options
from evaluation.options import add_run_options
from evaluation.outputs import run_record
from evaluation.pie.dataset import MAPPING_FILES, load_dataset
from evaluation.pie.layout import EditFormat
from evaluation.pie.run_log import LOGS, JsonLines, log_path, write_index
from evaluation.pie.runner import RunSettings, check_methods, run_items
from evaluation.pie.world import broadcast, gather, shard, world
from evaluation.registry import Registry
from evaluation.timing import StageTimer
from ldm.errors import DataError, UsageError
from ldm.model import open_model

DIST_TIMEOUT_MIN = 24 * 60


def add_arguments(p: argparse.ArgumentParser, registry: Registry) -> None:
    p.add_argument("--model", required=True, help="converted model directory (invedit convert), or tiny-random")
    p.add_argument("--data", required=True, help="PIE-Bench root: annotation_images/ and mapping_file.json")
    p.add_argument("--methods", nargs="+", required=True, metavar="INVERSION+EDIT",
                   help="method pairs by the reference's names, e.g. directinversion+p2p ddim+p2p ddim+masactrl "
                        "(see `invedit methods`); each is also its output folder")
    p.add_argument("--types", nargs="+", help="editing types 0..9 to run (default: all)")
    p.add_argument("--set", dest="kind", choices=tuple(MAPPING_FILES), default="pie",
                   help="pie: mapping_file.json; ti2i: mapping_file_ti2i_benchmark.json")
    p.add_argument("--format", choices=[f.value for f in EditFormat], default=EditFormat.PNG.value,
                   help="png: the edit alone, lossless (default); jpeg: the files the reference's evaluate.py reads, "
                        "its 4-panel strip [prompts | source | reconstruction | edit] at the .jpg name, quality 75")
    p.add_argument("--rerun", action="store_true", help="edit again items whose output exists (default: skip them)")
    p.add_argument("--stop-on-error", action="store_true",
                   help="stop at the first failing item (default: record the error and go on)")
    p.add_argument("--skip-bad", action="store_true", help="log and leave out malformed benchmark entries")
    p.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_MIN, metavar="MINUTES",
                   help="under torchrun: how long a rank that is done waits for the others at the final gather "
                        f"(default: {DIST_TIMEOUT_MIN})")
    add_run_options(p, output="runs folder RUNS: RUNS/<method>/annotation_images/..., RUNS/index.json, RUNS/logs/")


def check_runs_folder(path: str) -> Path:
    runs = Path(path)
    if runs.exists() and not runs.is_dir():
        raise UsageError(f"--output {runs} exists and is not a folder")
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot write the runs folder {runs}: {err.strerror or err}") from None
    return runs


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(2)


def run(args: argparse.Namespace, registry: Registry) -> int:
    options = check_run_options(args)
    methods = check_methods(registry, args.methods)
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout {args.dist_timeout}: expected a positive number of minutes")
    fmt = EditFormat(args.format)
    values = {"guidance": args.guidance, "seed": args.seed, **({"steps": args.steps} if args.steps else {})}
    timer = StageTimer()
    with timer("load_data"):
        data = load_dataset(args.data, args.kind, types=args.types, skip_bad=args.skip_bad)
    if not data.items:
        raise DataError(f"{args.data}: no items to run" + (f" of types {' '.join(args.types)}" if args.types else ""))
    runs = check_runs_folder(args.output)
    with world(args.device, timedelta(minutes=args.dist_timeout)) as (w, device):
        if w.leader:
            for line in data.skipped:
                print(f"skipped: {line}", file=sys.stderr)
        run_id = broadcast(new_run_id(), w)
        items = shard(data.items, w)
        settings = RunSettings(options.size, fmt, values, args.rerun, args.stop_on_error, run_id, w.rank)
        with timer("load_model"):
            sd = open_model(args.model, options.dtype, device)
        with timer("run"):
            records = run_items(sd, registry, items, methods, runs, settings,
                                log=JsonLines(log_path(runs, run_id, w.rank)), progress=options.progress and w.leader)
        mine = {"rank": w.rank, "device": str(device), "items": len(items), "timings_s": timer.as_dict()}
        everyone = gather({"records": records, "process": mine}, w)
    if everyone is None:  # not rank 0: the leader writes the index
        return int(any(r["status"] == "failed" for r in records))
    return finish(args, runs, run_id, w.size, backend=w.backend, gathered=everyone, items=len(data.items),
                  methods=methods, timings=timer.as_dict())


def finish(args: argparse.Namespace, runs: Path, run_id: str, size: int, *, backend: str | None,
           gathered: list[dict[str, Any]], items: int, methods: tuple[str, ...], timings: dict[str, float]) -> int:
    """Rank 0: write the index, print what happened, exit 1 if a job failed."""
    records = [r for part in gathered for r in part["records"]]
    params = {k: v for k, v in vars(args).items() if k not in ("func", "eval_what")}
    run = run_record("eval run", params, timings, run_id=run_id, world_size=size, backend=backend,
                     processes=[part["process"] for part in gathered], methods=list(methods), items=items)
    index = write_index(runs, run, records)
    tally = {s: sum(r["status"] == s for r in records) for s in ("edited", "existing", "failed")}
    print(f"{tally['edited']} edited, {tally['existing']} already there, {tally['failed']} failed "
          f"(methods x items: {len(methods)} x {items}, processes: {size}); "
          f"index {index}, logs {runs / LOGS}")
    return int(tally["failed"] > 0)
