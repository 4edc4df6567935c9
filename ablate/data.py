"""Packed, cached token batches for CPT and held-out evaluation.

(Being written: the loading functions land with the data-pipeline work. The
``PackedData`` container below is the contract that train and evaluate rely on.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PackedData"]


@dataclass(frozen=True)
class PackedData:
    """Token rows of exactly ``seq_len`` tokens, ready for causal-LM training.

    ``train`` is read in row order: row ``i`` is the ``i``-th sequence the trainer sees
    (the order is already shuffled deterministically by the seed it was built with).
    ``val`` rows never share a source document with ``train`` rows.
    """

    train: np.ndarray  # int32 [num_train_rows, seq_len] (may be a read-only np.memmap)
    val: np.ndarray  # int32 [num_val_rows, seq_len]
    seq_len: int
    source: str  # a human-readable description of where the tokens came from

    @property
    def train_tokens(self) -> int:
        return int(self.train.shape[0]) * self.seq_len

    @property
    def val_tokens(self) -> int:
        return int(self.val.shape[0]) * self.seq_len
