"""Small torch helpers shared by training, evaluation and analysis.

Imported only by modules that already run torch: importing it imports torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["evaluating"]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the block with ``model`` in eval mode and without gradients; restore its mode afterwards.

    Dropout is off and no autograd graph is kept; a model that was training trains again after
    the block, also when the block raised.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
