"""Grouping lanes by integer codes (the fast path's and the sweep's bookkeeping)."""

from __future__ import annotations

import numpy as np

__all__ = ["factorize", "group", "split"]


def factorize(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group of each lane, first lane of each group), groups numbered in order
    of first appearance."""
    import pandas as pd

    codes, uniq = pd.factorize(key, sort=False)
    first = np.full(len(uniq), -1, dtype=np.int64)
    # the first lane of each group: scatter lanes in reverse so the smallest wins
    first[codes[::-1]] = np.arange(codes.size - 1, -1, -1)
    return codes.astype(np.int64, copy=False), first


def group(n: int, *codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group lanes by equal tuples of integer codes: (group of each lane,
    first lane of each group)."""
    key = np.zeros(n, dtype=np.int64)
    for c in codes:
        size = int(c.max()) + 1 if c.size else 1
        if size > 1:  # a constant code does not split anything
            key = factorize(key * size + c)[0]  # re-compacted: stays < n, never overflows
    return factorize(key)


def split(groups: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(group, positions of that group in ``groups``)] for each group present."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    bounds = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1, order.size] if order.size else np.zeros(1, int)
    return [(int(sorted_groups[lo]), order[lo:hi]) for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
