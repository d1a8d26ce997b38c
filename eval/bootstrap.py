"""Percentile bootstrap intervals, one way for every benchmark here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def bootstrap(n: int, rounds: int, statistic: Callable[[np.ndarray], T], rng: Any) -> list[T]:
    """`statistic` of `rounds` resamples of n items with replacement, each drawn as `rng.choice(n, size=n)`.
    `rng` is a numpy Generator, or a RandomState where an official tool's own draws are reproduced (arena-hard-auto
    before v2.0 resamples with pandas' `sample(replace=True)`, which is RandomState.choice)."""
    return [statistic(rng.choice(n, size=n, replace=True)) for _ in range(rounds)]


def interval(samples: Any, axis: int | None = None) -> tuple[Any, Any]:
    """The 95% percentile interval of bootstrap samples; NaN samples (a model with no judgment in a resample) are
    left out."""
    low, high = np.nanpercentile(samples, [2.5, 97.5], axis=axis)
    return low, high
