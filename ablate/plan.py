"""Layer plans of depth up-scaled variants: pure Python, no torch.

SOLAR's Depth Up-Scaling (arXiv 2312.15166) takes a base model with ``n`` decoder
layers, makes a copy, drops the last ``m`` layers of the original and the first ``m``
layers of the copy, and stacks the two. Result layer ``j`` takes base layer ``j`` for
``j < n - m`` and base layer ``j - (n - 2m)`` after that, so the result has
``s = 2 (n - m)`` layers. ``m = n/2`` gives back the base model exactly (the control),
``m = 0`` stacks the whole model twice, and ``m > n/2`` prunes the middle.
"""

from __future__ import annotations

__all__ = ["layer_plan", "upscaled_depth", "mergekit_slices"]


def _check(n: int, m: int) -> None:
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
    if n < 1:
        raise ValueError(f"n={n}, m={m}: a base model needs at least one layer")
    if not 0 <= m < n:
        raise ValueError(f"m={m} is out of range for n={n}: choose 0 <= m < n (m = n/2 is the base model)")


def layer_plan(n: int, m: int) -> list[int]:
    """The base-layer index of each layer of DUS(n, m): ``[0 .. n-m-1] + [m .. n-1]``.

    >>> layer_plan(32, 8)[:3], layer_plan(32, 8)[22:26], len(layer_plan(32, 8))
    ([0, 1, 2], [22, 23, 8, 9], 48)
    """
    _check(n, m)
    return list(range(n - m)) + list(range(m, n))


def upscaled_depth(n: int, m: int) -> int:
    """``s = 2 (n - m)``, the number of layers of DUS(n, m)."""
    _check(n, m)
    return 2 * (n - m)


def mergekit_slices(n: int, m: int) -> list[tuple[int, int]]:
    """The plan as mergekit ``passthrough`` layer ranges (half-open ``[start, end)``)."""
    _check(n, m)
    return [(0, n - m), (m, n)]
