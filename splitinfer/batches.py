"""Feeding any number of samples to a model whose batch dimension is fixed.

One copy for every side: the edge agent sends a call as requests of the split's fixed
batch, the worker runs a fixed-batch tail in chunks, the simulators run a fixed-batch
reference model. The last chunk is padded with copies of its last sample; callers cut the
concatenated outputs back to the samples they were given (inference is per sample).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

__all__ = ["padded_chunks"]

K = TypeVar("K")
Array = np.ndarray[Any, Any]


def padded_chunks(arrays: Mapping[K, Array], batch: int) -> list[dict[K, Array]]:
    """``arrays`` (same sample count on axis 0) as chunks of exactly ``batch`` samples."""
    if batch < 1 or not arrays:
        raise ValueError(f"padded_chunks: expected batch >= 1 and some arrays, got {batch}, "
                         f"{len(arrays)} arrays")
    samples = len(next(iter(arrays.values())))
    pad = -samples % batch
    if pad:
        arrays = {k: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)])
                  for k, a in arrays.items()}
    return [{k: a[i:i + batch] for k, a in arrays.items()}
            for i in range(0, samples + pad, batch)]
