"""`invedit eval report`: turn a scores CSV into a report people can look at.

    invedit eval report --scores scores.csv --data ROOT --runs RUNS -o REPORT

Reads the per-image CSV of `invedit eval score` (or the reference's evaluate.py), the benchmark's
mapping file (for each photo's editing type and prompt) and the runs folder (for the contact
sheets), and writes REPORT/report.md with its pictures (report.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.pie.dataset import MAPPING_FILES, load_dataset
from evaluation.pie.extras import require
from evaluation.pie.report import ReportSettings, write_report
from evaluation.pie.table import read_scores_csv
from ldm.errors import DataError, UsageError


def add_arguments(p: argparse.ArgumentParser, registry: object = None) -> None:
    p.add_argument("--scores", required=True, help="per-image CSV written by `invedit eval score`")
    p.add_argument("--data", required=True, help="PIE-Bench root (for editing types and source photos)")
    p.add_argument("--runs", required=True, help="runs folder (for the contact sheets)")
    p.add_argument("--set", dest="kind", choices=tuple(MAPPING_FILES), default="pie")
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument("--photos", type=int, default=ReportSettings.photos_per_sheet, help="photos per contact sheet")
    p.add_argument("--thumbnail", type=int, default=ReportSettings.thumbnail, help="tile width in the contact sheets (px)")
    p.add_argument("--skip-bad", action="store_true", help="leave out malformed mapping entries instead of stopping")


def run(args: argparse.Namespace, registry: object = None) -> int:
    require("matplotlib", command="eval report")
    if args.photos < 1 or not 16 <= args.thumbnail <= 1024:
        raise UsageError("--photos must be at least 1 and --thumbnail between 16 and 1024 pixels")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory")
    table = read_scores_csv(args.scores)
    data = load_dataset(args.data, args.kind, skip_bad=args.skip_bad)
    for line in data.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    known = {item.id for item in data.items}
    unknown = [i for i in table.ids if i not in known]
    if unknown:
        raise DataError(f"{args.scores}: item {unknown[0]} is not in {Path(args.data) / MAPPING_FILES[args.kind]}")
    report = write_report(output, table, data.items, args.runs, ReportSettings(args.photos, args.thumbnail),
                          sources=f"Scores: {args.scores}; data: {args.data}; edits: {args.runs}.")
    print(f"wrote {report}")
    return 0
