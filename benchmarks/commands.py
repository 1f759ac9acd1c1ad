"""`invedit bench`: the benchmarks and kernel checks as subcommands; results go where `--out` says.

cli.py builds the parser and calls `add_arguments(parser, registry)` then `run(args, registry)`.
Each subcommand is one function below that adds its parser to the subparsers and sets
`bench_run` to the function that runs it; adding a subcommand is writing that function and listing
it in SUBCOMMANDS. Every subcommand writes into `--out` (default: the current directory), never
into the source tree: benchmarks/results/ holds only the runs this repository records, copied
there on purpose.

Argparse errors go through the parser class cli.py passes (subparsers inherit it); bad values
found later are raised as UsageError (one line, exit code 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from ldm.errors import UsageError

# (args, registry) -> exit code. The registry is cli.py's method registry; bench kernel needs none.
Runner = Callable[[argparse.Namespace, Any], int]
MIN_REPEATS = 20  # fewer timed runs make the median too noisy to compare providers


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """The --out option every bench subcommand has."""
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="directory for the result files, created if missing (default: the current directory)",
    )


def check_out(out: Path) -> None:
    """Refuse an --out that cannot hold result files before any time is spent measuring."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")


def _kernel(subparsers: argparse._SubParsersAction, registry: Any) -> None:
    parser = subparsers.add_parser(
        "kernel",
        help="time the Triton attention kernel against each SDPA backend (--static: ptxas compile sweep)",
        description=(
            "Time the fused attention kernel against every SDPA backend on the SD-1.4 shapes and write "
            "kernel-<device>.json/.md; without a GPU, run the Triton-interpreter smoke set (correctness, no "
            "timings) and write kernel-cpu-interpret.json/.md. With --static, compile every block config for "
            "sm_80 and sm_90a instead and write kernel-static.json/.md and autotune.json."
        ),
    )
    add_out_option(parser)
    parser.add_argument(
        "--dtype", choices=["fp16", "bf16"], default="fp16", help="input dtype of the timed runs (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        metavar="N",
        help="untimed runs per provider before timing; the first ones run the autotuner (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=30,
        metavar="N",
        help=f"timed runs per provider, at least {MIN_REPEATS}; the median is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--static",
        action="store_true",
        help=(
            "compile every candidate block config for sm_80 and sm_90a and read registers, spills and shared "
            "memory from ptxas, instead of timing; needs no GPU, about 25 minutes on 2 cores (default: off)"
        ),
    )
    parser.add_argument(
        "--jobs", type=int, default=2, metavar="N", help="compile processes for --static (default: %(default)s)"
    )
    parser.add_argument(
        "--exclude-from",
        type=Path,
        default=None,
        metavar="FILE",
        help=(
            "with --static: a recorded compile check by another Triton version (JSON with 'what', 'versions' "
            "and 'failing', as benchmarks/results/kernel-static-triton3.6.json) whose failing configs "
            "autotune.json excludes (default: keep the exclusions of the installed kernels/data/autotune.json)"
        ),
    )
    parser.set_defaults(bench_run=_run_kernel)


def _run_kernel(args: argparse.Namespace, registry: Any) -> int:
    check_out(args.out)
    if args.repeats < MIN_REPEATS:
        raise UsageError(f"--repeats {args.repeats}: need at least {MIN_REPEATS} timed runs for a median")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be >= 0")
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be >= 1")
    if args.exclude_from is not None and not args.static:
        raise UsageError("--exclude-from applies to --static only")
    if args.static:
        from benchmarks.kernel_static import load_exclusions, run_sweep

        paths = run_sweep(args.out, args.jobs, load_exclusions(args.exclude_from))
        print(f"written: {', '.join(map(str, paths))}")
        print(f"to make the kernel autotune over this sweep, copy {paths[-1]} to kernels/data/autotune.json")
        return 0
    import torch

    from benchmarks.kernel_bench import run_kernel_bench

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    paths = run_kernel_bench(args.out, dtype, args.warmup, args.repeats)
    print(f"written: {', '.join(map(str, paths))}")
    return 0


def _edit(subparsers: argparse._SubParsersAction, registry: Any) -> None:
    import torch

    cuda = torch.cuda.is_available()
    parser = subparsers.add_parser(
        "edit",
        help="one whole DirectInversion + P2P edit, ours against the same edit written on diffusers",
        description=(
            "Time one DirectInversion + P2P (LocalBlend, PIE defaults) edit per stage, ours against a baseline "
            "written on diffusers, on the same weights, image, dtype and steps, each side in its own process; "
            "report UNet rows, peak memory and whether the two edits agree; write edit-<device>.json/.md. On a "
            "CPU with bf16 units our bf16 edit is timed too."
        ),
    )
    add_out_option(parser)
    parser.add_argument("--model", default="sd14-random", help=(
        "a diffusers folder (e.g. tests/data/tiny-sd), one of our model directories, tiny-random, or sd14-random "
        "(SD-1.4 widths, seeded random weights) (default: %(default)s)"))
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16" if cuda else "fp32",
                        help="the precision both sides run in (default: %(default)s)")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto", help=(
        "also time our edit in bf16 against our own --dtype run; auto: on a CPU with bf16 units (default: %(default)s)"))
    parser.add_argument("--size", type=int, default=512 if cuda else 256, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed edits first (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=5, metavar="N", help=(
        "steps of the warm-up edits and of the untimed memory-tracking edit, at most --steps: enough to page in the "
        "weights, build every kernel and reach the memory peak, whose size does not grow with the steps "
        "(default: %(default)s)"))
    parser.add_argument("--repeats", type=int, default=3, metavar="N",
                        help="timed edits per side; the median is reported (default: %(default)s)")
    parser.set_defaults(bench_run=_run_edit)


def _run_edit(args: argparse.Namespace, registry: Any) -> int:
    from benchmarks.edit_bench import BenchOptions, cpu_has_bf16, run_edit_bench
    from evaluation.commands.common import check_device

    check_out(args.out)
    device = check_device(args.device)
    if args.size <= 0 or args.size % 64:
        raise UsageError(f"--size {args.size}: expected a positive multiple of 64")
    if not 1 <= args.steps <= 1000:
        raise UsageError(f"--steps {args.steps}: expected 1..1000")
    if args.warmup_steps < 1:
        raise UsageError(f"--warmup-steps {args.warmup_steps}: expected at least 1")
    if args.warmup < 0 or args.repeats < 1:
        raise UsageError(f"--warmup {args.warmup} --repeats {args.repeats}: need warmup >= 0 and repeats >= 1")
    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and device.type == "cpu" and args.dtype != "bf16" and cpu_has_bf16())
    args.out.mkdir(parents=True, exist_ok=True)
    code, paths = run_edit_bench(BenchOptions(args.model, args.out, str(device), args.dtype, bf16, args.size, args.steps,
                                              args.warmup, args.repeats, min(args.warmup_steps, args.steps)))
    print(f"written: {', '.join(map(str, paths))}")
    if code:
        print("bench edit: the edits disagree (see the table); a faster edit that computes something else is no win")
    return code


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction, Any], None], ...] = (_kernel, _edit)


def add_arguments(parser: argparse.ArgumentParser, registry: Any) -> None:
    """Add the bench subcommands to `parser` (cli.py's parser for `invedit bench`)."""
    subparsers = parser.add_subparsers(dest="bench_what", required=True, metavar="WHAT", title="what to benchmark")
    for add in SUBCOMMANDS:
        add(subparsers, registry)


def run(args: argparse.Namespace, registry: Any) -> int:
    """Run the subcommand `args` was parsed for; returns the exit code."""
    runner: Runner = args.bench_run
    return runner(args, registry)
