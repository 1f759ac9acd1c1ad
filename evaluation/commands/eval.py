"""`invedit eval`: PIE-Bench, from running methods over the benchmark to scores and a report.

Subcommands, each a module with `add_arguments(parser, registry)` and `run(args, registry)`:
`run` (edit the benchmark with inversion x editing methods, evaluation/pie/run_command.py),
`score` (the seven metrics as the reference computes them, evaluation/pie/score_command.py) and
`report` (tables beside the reference's Table 1, a plot, contact sheets; report_command.py).
docs/evaluation.md describes the benchmark and the metrics.
"""

from __future__ import annotations

import argparse
import importlib

from evaluation.registry import Registry

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("evaluation.pie.run_command", "edit PIE-Bench with inversion x editing methods into RUNS (resumable, torchrun)"),
    "score": ("evaluation.pie.score_command", "score edits written in the runs layout: the seven PIE-Bench metrics"),
    "report": ("evaluation.pie.report_command", "markdown report beside the reference's Table 1, a plot, contact sheets"),
}


def add_arguments(p: argparse.ArgumentParser, registry: Registry) -> None:
    p.description = __doc__.splitlines()[0]
    sub = p.add_subparsers(dest="eval_what", required=True, metavar="WHAT")
    for name, (module, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module(module).add_arguments(sp, registry)


def run(args: argparse.Namespace, registry: Registry) -> int:
    module = importlib.import_module(SUBCOMMANDS[args.eval_what][0])
    return int(module.run(args, registry) or 0)
