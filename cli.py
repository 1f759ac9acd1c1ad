"""`invedit`: the command-line entry point.

Each subcommand lives in the module that owns its job and exposes `main(argv) -> int`; this file
only dispatches and turns user-facing errors (InveditError) into one line on stderr and exit code 2.
Modules are imported on demand so `invedit --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("ldm.model", "build a model (e.g. --model tiny-random) and print its size and sites"),
    "convert": ("weights.convert", "convert an SD-1.x checkpoint (.ckpt, .safetensors, diffusers folder) into a model directory"),
    "reconstruct": ("evaluation.reconstruct", "invert an image and reconstruct it with its prompt (ddim|direct|negative-prompt|null-text)"),
    "edit": ("evaluation.edit", "invert an image and edit it: --source/--target prompts, --control p2p|p2p-replace|masactrl|pnp|none"),
    "bench": ("kernels.bench", "benchmark: `bench kernel` times the Triton attention against each SDPA backend (--static: ptxas check)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: invedit COMMAND [options]   (invedit COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ldm.errors import InveditError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"invedit: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except InveditError as err:
        print(f"invedit {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"invedit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
