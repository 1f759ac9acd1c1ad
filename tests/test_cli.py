"""The `invedit` entry point: every command is listed, and a bad command or option is one line on
stderr with exit code 2 (argparse's own errors included), never a traceback or a usage block."""

from __future__ import annotations

import pytest

import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("convert", "reconstruct", "edit", "bench", "info"):
        assert f"  {name}" in out


def test_unknown_command_is_one_line_exit_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["reconstruct", "--model", "tiny-random", "--image", "x.png", "--prompt", "a", "-o", "o", "--inversion", "nope"],
        ["reconstruct", "--model", "tiny-random"],
        ["edit", "--model", "tiny-random", "--image", "x.png", "--source", "a", "--target", "b", "-o", "o", "--steps", "x"],
        ["convert", "only-one-argument"],
        ["info", "--size", "big"],
        ["bench", "kernel", "--no-such-flag"],
    ],
    ids=["bad-choice", "missing-required", "bad-int", "missing-positional", "info-bad-int", "bench-bad-flag"],
)
def test_bad_options_are_one_line_exit_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"invedit {argv[0]}: error:")
    assert list(tmp_path.iterdir()) == []
