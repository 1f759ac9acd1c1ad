"""`invedit`: the command-line entry point.

Each command is a module exposing `add_arguments(parser, registry)` and `run(args, registry) -> int`;
this file owns argument parsing (one parser class whose errors are one line) and turns user-facing
errors (InveditError) into one line on stderr and exit code 2. The method registry
(evaluation/registry.py) is passed to every command, so the options of `edit`, `reconstruct` and
`invert` are generated from it, and a caller (a test, a plugin) can hand a registry with more
methods to `main(argv, registry)`. Modules are imported on demand so `invedit --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from evaluation.registry import Registry

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "edit": ("evaluation.commands.edit", "invert a photo and edit it under --target prompts (--inversion, --control)"),
    "generate": ("evaluation.commands.generate", "make pictures from a prompt (DDIM, guidance, negative prompt, seed)"),
    "reconstruct": ("evaluation.commands.reconstruct", "invert a photo and reconstruct it with its own prompt"),
    "invert": ("evaluation.commands.invert", "invert a photo once and write the inversion to a file (edit it many times)"),
    "eval": ("evaluation.commands.eval", "PIE-Bench: `eval run` (edit it), `eval score` (the seven metrics), `eval report` (tables, plot, contact sheets)"),
    "methods": ("evaluation.commands.methods", "list the inversion and editing methods, their names and options"),
    "convert": ("weights.convert", "convert an SD-1.x checkpoint (.ckpt, .safetensors, diffusers folder) into a model directory"),
    "info": ("evaluation.commands.info", "build a model (e.g. --model tiny-random) and print its size and sites"),
    "bench": ("benchmarks.commands", "benchmarks: `bench edit` times one whole edit against diffusers, `bench kernel` the Triton attention against each SDPA backend"),
}


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("invedit")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: invedit COMMAND [options]   (invedit COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "  --version   print the version"]
    return "\n".join(lines)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors, so a bad option is one line and exit code 2 like
    every other user error (argparse itself prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        from ldm.errors import UsageError

        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None, registry: "Registry | None" = None) -> int:
    from ldm.errors import InveditError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"invedit {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"invedit: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        if registry is None:
            from evaluation.registry import Registry

            registry = Registry()
        module = importlib.import_module(COMMANDS[name][0])
        parser = ArgumentParser(prog=f"invedit {name}", formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser, registry)
        args = parser.parse_args(rest)
        return int(module.run(args, registry) or 0)
    except InveditError as err:
        print(f"invedit {name}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as done:  # argparse's --help
        return int(done.code or 0)
    except KeyboardInterrupt:
        print(f"invedit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
