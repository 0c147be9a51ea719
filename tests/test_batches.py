from __future__ import annotations

import numpy as np
import pytest

from splitinfer.batches import padded_chunks


@pytest.mark.parametrize(("samples", "batch", "chunks"), [(1, 1, 1), (5, 2, 3), (4, 4, 1),
                                                          (3, 4, 1), (10, 4, 3)])
def test_chunks_are_exactly_the_batch_the_last_padded_with_its_last_sample(
        samples: int, batch: int, chunks: int) -> None:
    x = np.arange(samples * 2, dtype=np.float32).reshape(samples, 2)
    y = np.arange(samples, dtype=np.int64)
    out = padded_chunks({"x": x, "y": y}, batch)
    assert len(out) == chunks and all(len(c["x"]) == len(c["y"]) == batch for c in out)
    joined = np.concatenate([c["x"] for c in out])
    np.testing.assert_array_equal(joined[:samples], x)
    assert (joined[samples:] == x[-1]).all()
    np.testing.assert_array_equal(np.concatenate([c["y"] for c in out])[:samples], y)


def test_bad_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="batch >= 1"):
        padded_chunks({"x": np.zeros((2, 1))}, 0)
