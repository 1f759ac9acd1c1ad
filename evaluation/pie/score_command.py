"""`invedit eval score`: score a runs folder on PIE-Bench with the reference's metrics.

    invedit eval score --data ROOT --runs RUNS [--methods M ...] [--types T ...] -o scores.csv

Writes scores.csv (per image, the reference's layout), scores_summary.csv (means at the paper's
scales with valid counts, over all items and per editing type) and scores.json (every setting,
the weights used, versions, timings); prints the summary as a markdown table. Networks load
offline (networks.py) and only for the metrics asked for; a missing one is reported before any
scoring starts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evaluation.commands.common import check_device
from evaluation.outputs import run_record
from evaluation.timing import StageTimer
from ldm.files import write_json
from evaluation.pie.dataset import IMAGES_DIR, MAPPING_FILES, check_types, load_dataset
from evaluation.pie.extras import require
from evaluation.pie.layout import check_method
from evaluation.pie.metrics import DEFAULT_METRICS, METRICS
from evaluation.pie.structure import StructureSettings
from ldm.errors import DataError, UsageError

if TYPE_CHECKING:
    from evaluation.pie.scores import Scorers


def add_arguments(p: argparse.ArgumentParser, registry: object = None) -> None:
    p.add_argument("--data", required=True, help="PIE-Bench root: annotation_images/ and mapping_file.json")
    p.add_argument("--runs", required=True, help="runs folder: RUNS/<method>/annotation_images/...")
    p.add_argument("--methods", nargs="+", help="methods to score (default: every folder of RUNS with annotation_images/)")
    p.add_argument("--types", nargs="+", help="editing types 0..9 to score (default: all)")
    p.add_argument("--set", dest="kind", choices=tuple(MAPPING_FILES), default="pie",
                   help="pie: mapping_file.json; ti2i: mapping_file_ti2i_benchmark.json (no masks: masked metrics are NaN)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="METRIC",
                   help=f"default: the reference's eight ({' '.join(DEFAULT_METRICS)})")
    p.add_argument("-o", "--output", required=True, help="per-image CSV to write (its _summary.csv and .json beside it)")
    p.add_argument("--clip", help="CLIP ViT-L/14 folder (default: openai/clip-vit-large-patch14 in the Hugging Face cache)")
    p.add_argument("--dino", help="DINO ViT-B/8 folder (default: facebook/dino-vitb8 in the Hugging Face cache)")
    p.add_argument("--lpips", help="torchvision SqueezeNet 1.1 checkpoint (default: torch hub's checkpoints/ folder)")
    p.add_argument("--dino-antialias", action="store_true",
                   help="antialias the DINO input resize (torchvision >= 0.17's default; the reference's era did not)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-bad", action="store_true", help="log and leave out bad items and missing edits instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def find_methods(runs: Path) -> list[str]:
    """Every method folder of RUNS that holds annotation_images/, sorted."""
    if not runs.is_dir():
        raise DataError(f"{runs}: no such runs folder")
    methods = sorted(p.name for p in runs.iterdir() if (p / IMAGES_DIR).is_dir() and not p.name.startswith("."))
    if not methods:
        raise DataError(f"{runs}: no <method>/{IMAGES_DIR}/ folders inside")
    return methods


def check_metrics(metrics: list[str]) -> tuple[str, ...]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric {unknown[0]!r}; choose from {' '.join(METRICS)}")
    return tuple(dict.fromkeys(metrics))


def load_scorers(metrics: tuple[str, ...], args: argparse.Namespace) -> Scorers:
    """Only the networks the metrics need, each from its option or its default place."""
    from evaluation.pie import networks
    from evaluation.pie.scores import Scorers

    needed = {METRICS[m].network for m in metrics}
    clip = structure = lpips = None
    if "lpips" in needed:  # first: the cheapest to check, and the one most often missing
        lpips = networks.load_lpips(args.lpips).to(args.device)
    if "dino" in needed:
        from evaluation.pie.structure import StructureDistance

        settings = StructureSettings(antialias=args.dino_antialias)
        structure = StructureDistance(networks.load_dino(args.dino), settings, args.device)
    if "clip" in needed:
        from evaluation.pie.clip import ClipScore

        clip = ClipScore(*networks.load_clip(args.clip), device=args.device)
    return Scorers(clip=clip, structure=structure, lpips=lpips, device=args.device)


def weights_used(metrics: tuple[str, ...], args: argparse.Namespace) -> dict[str, str]:
    """network -> the folder, file or hub id it was loaded from, for the run record."""
    from evaluation.pie.networks import CLIP_DEFAULT, DINO_DEFAULT, squeezenet_path

    needed = {METRICS[m].network for m in metrics}
    sources = {"clip": lambda: args.clip or CLIP_DEFAULT, "dino": lambda: args.dino or DINO_DEFAULT,
               "lpips": lambda: str(squeezenet_path(args.lpips))}
    return {name: source() for name, source in sources.items() if name in needed}


def run(args: argparse.Namespace, registry: object = None) -> int:
    require("torchmetrics", command="eval score")
    from evaluation.pie.scores import score_runs
    from evaluation.pie.summary import markdown_table, summarize, summary_rows, write_summary_csv
    from evaluation.pie.table import write_scores_csv

    metrics = check_metrics(args.metrics)
    check_types(args.types)
    check_device(args.device)
    output = Path(args.output)
    if output.suffix.lower() != ".csv":
        raise UsageError(f"--output {output}: expected a .csv file name")
    timer = StageTimer()
    with timer("load_data"):
        data = load_dataset(args.data, args.kind, types=args.types, skip_bad=args.skip_bad)
        runs = Path(args.runs)
        methods = [check_method(m) for m in args.methods] if args.methods else find_methods(runs)
    for line in data.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    with timer("load_networks"):
        scorers = load_scorers(metrics, args)
    with timer("score"):
        table, skipped = score_runs(data.items, runs, methods, metrics, scorers,
                                    skip_bad=args.skip_bad, progress=not args.no_progress)
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    summary_path = output.with_name(f"{output.stem}_summary.csv")
    write_scores_csv(output, table)
    write_summary_csv(summary_path, table, data.items)
    summary = summarize(table)
    params = {k: v for k, v in vars(args).items() if k not in ("func", "eval_what")}
    record = run_record(
        "eval score", params, timer.as_dict(),
        structure=asdict(StructureSettings(antialias=args.dino_antialias)), weights=weights_used(metrics, args),
        methods=methods, items=len(data.items),
        skipped=list(data.skipped) + skipped, files={"scores": str(output), "summary": str(summary_path)},
    )
    write_json(output.with_suffix(".json"), record)
    print(markdown_table(summary_rows(summary, metrics), metrics))
    print(f"\nwrote {output}, {summary_path} and {output.with_suffix('.json')}")
    return 0
