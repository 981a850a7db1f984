"""Small statistics helpers shared by the reports (accuracy tables, BF16-vs-Int4 deltas)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Cap on resampled elements held at once, so large inputs do not build an (n, N) array in one go.
_CHUNK_ELEMENTS = 4_000_000


def bootstrap_ci(
    values: Sequence[Any] | np.ndarray,
    stat: Callable[..., Any] = np.mean,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Seeded percentile-bootstrap (1 - alpha) confidence interval of ``stat(values)``.

    ``values`` is resampled with replacement along its first axis, so rows of a 2-D array stay
    together (e.g. paired BF16/Int4 scores per item). ``stat`` receives one resample at a time, or,
    for 1-D input and numpy reductions that accept ``axis``, a whole chunk at once (much faster).
    Returns ``(nan, nan)`` for empty input. The same inputs and seed always give the same interval.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim == 0:
        raise ValueError("values must be a sequence, not a scalar")
    if x.shape[0] == 0:
        return (float("nan"), float("nan"))
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    rng = np.random.default_rng(seed)
    size = x.shape[0]
    row_elems = max(1, x.size)
    chunk = max(1, _CHUNK_ELEMENTS // row_elems)
    stats = np.empty(n, dtype=float)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        resamples = x[rng.integers(0, size, size=(m, size))]
        stats[start : start + m] = _apply(stat, resamples)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def _apply(stat: Callable[..., Any], resamples: np.ndarray) -> np.ndarray:
    if resamples.ndim == 2:
        try:
            out = np.asarray(stat(resamples, axis=1), dtype=float)
            if out.shape == (resamples.shape[0],):
                return out
        except TypeError:
            pass  # stat has no ``axis``: fall back to one call per resample
    return np.array([float(stat(r)) for r in resamples])
