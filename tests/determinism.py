"""Bit-for-bit repeatability for tests that run a gradient optimisation twice.

On two CPU threads a backward pass may sum the same terms in a different order from one run to
the next (measured: 1e-5 in the first round's loss of a StyleDiffusion inversion), and an
optimisation amplifies that. Tests whose property is "the same inputs give the same result" (no
state leaks between runs, two code paths run the same optimisation) run it on one thread, where
the order is fixed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
