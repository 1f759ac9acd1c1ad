"""The optional packages of the `eval` extra (torchmetrics for the metrics, matplotlib for the
report's plot): a command that needs one says so in one line instead of failing on an import."""

from __future__ import annotations

import importlib.util

from ldm.errors import UsageError


def require(*modules: str, command: str) -> None:
    """UsageError naming the first missing module and the install line that brings it."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"{command} needs {module}, from the eval extra: pip install -e '.[eval]'")
