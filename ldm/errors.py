"""User-facing errors: each names the file or value at fault and what was expected.

cli.py turns any InveditError into one line on stderr and exit code 2. The types live in ldm/, the
bottom of the model stack, because ldm is the lowest layer that raises them (the loader refuses bad
weights, the tokenizer over-long prompts); every layer above uses the same types.
"""


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
