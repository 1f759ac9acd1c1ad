"""`invedit bench` (benchmarks/commands.py) through a parser built as cli.py builds it: subcommands,
a help line with its default for every option, one-line UsageErrors, and results written into
`--out` or the current directory, never into the source tree.

The kernel run takes ~15 s on 2 CPU cores (the Triton interpreter smoke set in a child process);
the --static run replaces the ~25-minute ptxas sweep by canned compile results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NoReturn

import pytest

from benchmarks import commands, kernel_static
from kernels import triton_attention
from ldm.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


class UsageErrorParser(argparse.ArgumentParser):
    """What cli.py passes: argparse errors become one-line UsageErrors instead of sys.exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parser() -> UsageErrorParser:
    parser = UsageErrorParser(prog="invedit bench")
    commands.add_arguments(parser, registry=None)
    return parser


def _bench(argv: list[str]) -> int:
    return commands.run(_parser().parse_args(argv), registry=None)


def _source_tree_snapshot() -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted((REPO / "benchmarks").rglob("*")) + sorted((REPO / "kernels").rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_kernel_option_has_a_help_line_with_its_default():
    parser = _subparser("kernel")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and "(default:" in action.help, action.option_strings
    text = parser.format_help()
    assert "--out DIR" in text and "the current directory" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["nonsense"], "invalid choice"),
        (["kernel", "--no-such-flag"], "unrecognized"),
        (["kernel", "--repeats", "x"], "invalid int"),
        (["kernel", "--repeats", "5"], "at least 20"),
        (["kernel", "--jobs", "0"], "--jobs"),
        (["kernel", "--exclude-from", "x.json"], "--static only"),
        (["kernel", "--static", "--exclude-from", "missing.json"], "cannot read"),
        (["kernel", "--static", "--exclude-from", "bad.json"], "not a recorded compile check"),
        (["kernel", "--out", "a-file"], "not a directory"),
    ],
)
def test_bad_options_are_one_line_usage_errors(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bad.json").write_text('{"failing": []}')
    before = sorted(tmp_path.iterdir())
    with pytest.raises(UsageError, match=message) as err:
        _bench(argv)
    assert "\n" not in str(err.value)
    assert sorted(tmp_path.iterdir()) == before  # refused before anything was written


def test_kernel_bench_writes_into_the_current_directory_and_not_the_source_tree(tmp_path, monkeypatch, capsys):
    """Without a GPU: the interpreter smoke set; its files land in the cwd, or in --out."""
    before = _source_tree_snapshot()
    monkeypatch.chdir(tmp_path)
    assert _bench(["kernel"]) == 0
    assert _source_tree_snapshot() == before
    result = json.loads((tmp_path / "kernel-cpu-interpret.json").read_text())
    assert len(result["rows"]) == 36 and all(r["kernel_err"] <= 2 * r["plain_torch_err"] + 1e-3 for r in result["rows"])
    assert (tmp_path / "kernel-cpu-interpret.md").read_text().startswith("# Attention kernel smoke set")
    assert "kernel-cpu-interpret.json" in capsys.readouterr().out


def test_static_sweep_writes_its_records_and_the_autotune_file_into_out(tmp_path, monkeypatch):
    """--static with canned compile results (the real sweep takes ~25 minutes): kernel-static.json/.md
    and autotune.json go to --out; autotune.json holds the sweep's passing lists and keeps the
    shipped exclusions, or takes a recorded check's failures with --exclude-from."""

    def fake_sweep(head_dims, dtypes, configs, archs=kernel_static.ARCHS, jobs=1):
        return [
            kernel_static.StaticResult(
                arch=f"sm_{a}", head_dim=d, dtype=kernel_static._TL_TYPE[t], config=str(c), registers=128,
                spill_stores=0 if c.block_m == 32 else 8, spill_loads=0, shared_bytes=1024,
                shared_limit=kernel_static.SHARED_LIMIT[a], compile_s=0.0,
            )
            for a in archs for d in head_dims for t in dtypes for c in configs
        ]

    monkeypatch.setattr(kernel_static, "sweep", fake_sweep)
    before = _source_tree_snapshot()
    out = tmp_path / "new" / "dir"
    assert _bench(["kernel", "--static", "--out", str(out)]) == 0
    assert _source_tree_snapshot() == before
    assert sorted(p.name for p in out.iterdir()) == ["autotune.json", "kernel-static.json", "kernel-static.md"]
    swept = json.loads((out / "kernel-static.json").read_text())
    record = json.loads((out / "autotune.json").read_text())
    shipped = triton_attention.autotune_record()
    assert record == kernel_static.make_autotune_record(swept, shipped["excluded"])
    assert record["passing"]["d40-fp16"][0] == "M32-N16-w4-s2"
    assert all(name.startswith("M32-") for names in record["passing"].values() for name in names)

    check = tmp_path / "check.json"
    check.write_text(json.dumps({"what": "a test check", "versions": {"triton": "9.9"}, "failing": ["d40-fp16-M32-N16-w4-s2"]}))
    assert _bench(["kernel", "--static", "--out", str(out), "--exclude-from", str(check)]) == 0
    excluded = json.loads((out / "autotune.json").read_text())["excluded"]
    assert excluded["configs"] == ["d40-fp16-M32-N16-w4-s2"] and excluded["triton"] == "9.9"
