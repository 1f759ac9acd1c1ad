"""PIE-Bench edit masks: the mapping file's (start, length) run list -> a boolean image.

The encoding is the one cure-lab/PnPInversion's `mask_decode` reads (evaluation/evaluate.py, the
same function in run_editing_p2p.py): the list holds consecutive pairs (start, length); each pair
marks the flat indices start .. start + length - 1 of the row-major (C-order) flattening of a
512x512 image as "to edit". A run that passes the last pixel is cut there. It is not COCO RLE
(column-major, alternating zero/one counts). After decoding, the reference forces the outermost
one-pixel frame to 1 "to avoid annotation errors in boundary", so the unedited region (the
background the preservation metrics look at) never includes the image border. We do the same.

Where the reference would crash (an odd-length list) or silently write elsewhere (a negative
start indexes from the end in numpy; a start past the end is skipped), we refuse with the reason.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ldm.errors import DataError

MASK_SHAPE = (512, 512)  # (height, width): the reference's decoder is hard-wired to this size


def decode_mask(encoded: Sequence[int], shape: tuple[int, int] = MASK_SHAPE) -> np.ndarray:
    """(start, length) pairs -> (H, W) bool, True = region to edit, the one-pixel border forced True.

    Raises DataError (without naming the item; the reader adds that) for a list that is not
    pairs of non-negative integers with every start inside the image.
    """
    if not isinstance(encoded, (list, tuple)):
        raise DataError(f"mask is a {type(encoded).__name__}, expected a list of (start, length) integer pairs")
    if len(encoded) % 2:
        raise DataError(f"mask has {len(encoded)} numbers, expected (start, length) pairs (an even count)")
    # bool is an int subclass in Python; a true/false in the file is a corrupt mask, not 1/0
    bad = next((v for v in encoded if isinstance(v, bool) or not isinstance(v, int)), None)
    if bad is not None:
        raise DataError(f"mask holds {bad!r}, expected integers")
    height, width = shape
    size = height * width
    runs = np.asarray(encoded, dtype=np.int64).reshape(-1, 2)  # (pairs, 2): start, length
    starts, lengths = runs[:, 0], runs[:, 1]
    if len(runs) and (starts.min() < 0 or starts.max() >= size):
        worst = int(starts.min() if starts.min() < 0 else starts.max())
        raise DataError(f"mask run starts at {worst}, outside the {height}x{width} image (0..{size - 1})")
    if len(runs) and lengths.min() < 0:
        raise DataError(f"mask run has negative length {int(lengths.min())}")
    # Mark each run by +1 at its start and -1 just past its (clipped) end; a running sum > 0 is
    # inside some run. Overlapping runs simply stack, as repeated assignment of 1 does.
    ends = np.minimum(starts + lengths, size)
    edges = np.zeros(size + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    mask = (np.cumsum(edges[:size]) > 0).reshape(height, width)  # row-major, as numpy's default reshape
    mask[0, :] = mask[-1, :] = True
    mask[:, 0] = mask[:, -1] = True
    return mask
