"""User-facing errors: each names the file or value at fault and what was expected.

cli.py turns any InveditError into one line on stderr and exit code 2 (DESIGN.md §9).
"""

import argparse
from typing import NoReturn


class InveditError(Exception):
    """A failure caused by the user's input, reported without a traceback."""


class WeightsError(InveditError):
    """Missing, corrupt, unsafe or wrong-model checkpoint."""


class ImageError(InveditError):
    """Unreadable image or unusable size."""


class PromptError(InveditError):
    """Prompt too long, blend word absent, replace prompts of different word counts, ..."""


class UsageError(InveditError):
    """Bad option values or combinations."""


class DataError(InveditError):
    """Missing or malformed benchmark data: a root, a mapping file, an entry, an image or a mask."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors, so a bad option is one line and exit code 2 like
    every other user error (argparse itself prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")
