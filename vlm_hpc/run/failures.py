"""Why a row is in the failure ledger (`failures/slice_{I}.jsonl`, its "reason" field): the whole vocabulary.

The ledger is read by people and scripts (and `verify` counts its rows), so a new reason is added here, with
what it means, before any code writes it.
"""

from __future__ import annotations

from typing import Literal

FailureReason = Literal[
    "missing",  # the image cell is empty (None)
    "not_downloaded",  # img2dataset's status is not success (a failed download or resize): its error_message
    "empty",  # the image has zero bytes
    "undecodable",  # not an image, a corrupt header or pixel data, a zero dimension, truncated beyond repair
    "too_many_pixels",  # over the decompression-bomb limit (preprocess.decode.MAX_PIXELS)
    "truncated",  # cut short: captioned like the original (rest black), or skipped with tiling.skip_truncated
    "missing_key",  # the key cell is empty
    "duplicate_key",  # an earlier row has the same key and is captioned
    "out_of_memory",  # out of GPU memory even alone at the fewest tiles
    "empty_caption",  # the model produced no text
]
