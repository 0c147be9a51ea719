"""The one check of tensors against a split's specs, on the device and on the worker.

::

    from splitinfer.tensors import check_tensors

    arrays = check_tensors({"x": batch}, manifest.inputs, "model inputs", manifest.split_id,
                           any_batch=True)                      # the edge agent
    arrays = check_tensors(envelope.tensors, manifest.cut, "cut tensors", manifest.split_id,
                           any_batch=fixed, min_samples=1, names_error=TensorError)  # a worker

Both sides used to hold their own copy of these rules, and a fault read differently
depending on where it was caught; here one function says, for the same fault, the same
thing, prefixed ``"{what} of {split_id}: "``:

* names: ``expected ['x'], got ['y'] (missing ['x']; unexpected ['y']; duplicated […])`` —
  the caller's ``names_error`` (BadInputError on the device, where a wrong key is a
  caller's mistake; TensorError on the worker, answered ``bad_tensor``). Names a device
  sent are shown cut short (a few, each at most 40 characters): they are hostile input.
* not an array: ``tensor 'x' must be a numpy array, got list``;
* no batch axis: ``tensor 'x': expected shape (N, 4) (samples first), got a scalar``;
* dtype, rank, fixed dimensions: :meth:`TensorSpec.check` (``expected dtype float32, got
  float64``, ``expected 2 dims (N, 4), got shape (4,)``, ``expected shape (N, 4), got (2,
  5)``); symbolic dimensions take any size, and with ``any_batch`` so does a fixed first
  one (a call of any number of samples goes out in requests of the files' fixed batch);
* quantization, where the tensors carry one (wire tensors, not bare arrays): ``the cut is
  not quantized (float32); expected no 'q', got one`` or ``expected quantization [0.05,
  3], got [0.1, 3]``;
* samples: ``tensor 'y': expected 2 samples as the tensors before it, got 3``; and with
  ``min_samples``: ``expected at least one sample, got an empty batch``.

Everything but the names raises :class:`~splitinfer.errors.TensorError`. Imports only the
contract's own modules and numpy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from splitinfer.errors import BadInputError, TensorError
from splitinfer.manifest import Quantization, TensorSpec

__all__ = ["Carried", "check_tensors", "names_shown"]

Array = np.ndarray[Any, Any]


class Carried(Protocol):
    """A tensor as it crossed the wire (:class:`splitinfer.wire.WireTensor` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def array(self) -> Array: ...

    @property
    def quantization(self) -> Quantization | None: ...


def names_shown(names: Iterable[str], most: int = 8) -> str:
    """Tensor names for a message: a few, each cut short (a device's names are hostile)."""
    shown = [name if len(name) <= 40 else name[:37] + "..." for name in names]
    more = f" and {len(shown) - most} more" if len(shown) > most else ""
    return f"{shown[:most]}{more}"


def check_tensors(tensors: Mapping[str, Any] | Sequence[Carried],
                  specs: Sequence[TensorSpec], what: str, split_id: str | None = None, *,
                  any_batch: bool = False, min_samples: int = 0,
                  names_error: type[BadInputError] = BadInputError) -> dict[str, Array]:
    """``tensors`` keyed and ordered as ``specs``, each checked; the message names the
    fault, what was expected and what came (see the module docstring for each).

    ``tensors``: arrays by name, or wire tensors (name, array, quantization) in the order
    they came, whose names may repeat (a duplicate is a fault) and whose quantization must
    be the spec's. ``what`` and ``split_id`` prefix every message. ``any_batch`` leaves
    the first (samples) dimension unchecked; ``min_samples`` is the fewest samples
    accepted (a worker's 1: an empty batch has nothing to run).
    """
    where = f"{what} of {split_id}" if split_id else what
    arrays: Mapping[str, Any] = {}
    carried: dict[str, Carried] = {}
    if isinstance(tensors, Mapping):
        got = list(tensors)
        arrays = tensors
    else:
        got = [t.name for t in tensors]
        carried = {t.name: t for t in tensors}
    want = [s.name for s in specs]
    if len(got) != len(want) or set(got) != set(want):
        _names_fault(where, want, got, names_error, split_id)
    out: dict[str, Array] = {}
    samples: int | None = None
    for spec in specs:
        item = carried.get(spec.name)  # None: a bare array, which carries no quantization
        array = item.array if item is not None else arrays[spec.name]
        if not isinstance(array, np.ndarray):
            raise TensorError(f"{where}: tensor {spec.name!r} must be a numpy array, got "
                              f"{type(array).__name__}", split_id=split_id)
        if array.ndim == 0 and spec.shape:
            raise TensorError(f"{where}: tensor {spec.name!r}: expected shape "
                              f"{spec.shape_text(any_batch=any_batch)} (samples first), got "
                              "a scalar", split_id=split_id)
        try:
            spec.check(array, any_batch=any_batch)
        except TensorError as exc:
            raise TensorError(f"{where}: {exc}", split_id=split_id) from None
        if item is not None and item.quantization is not None:
            _check_quantization(where, spec, item.quantization, split_id)
        if array.ndim:
            n = int(array.shape[0])
            if samples is None:
                samples = n
            elif n != samples:
                raise TensorError(f"{where}: tensor {spec.name!r}: expected {samples} "
                                  f"samples as the tensors before it, got {n}",
                                  split_id=split_id)
        out[spec.name] = array
    if min_samples and (samples or 0) < min_samples:
        fewest = "one sample" if min_samples == 1 else f"{min_samples} samples"
        raise TensorError(f"{where}: expected at least {fewest}, got "
                          + ("an empty batch" if not samples else f"{samples}"),
                          split_id=split_id)
    return out


def _names_fault(where: str, want: list[str], got: list[str],
                 error: type[BadInputError], split_id: str | None) -> None:
    missing = [n for n in want if n not in got]
    extra = [n for n in dict.fromkeys(got) if n not in want]
    counts = Counter(got)
    twice = [n for n, k in counts.items() if k > 1]
    detail = "; ".join(part for part in (
        f"missing {missing}" if missing else "",
        f"unexpected {names_shown(extra)}" if extra else "",
        f"duplicated {names_shown(twice)}" if twice else "") if part)
    raise error(f"{where}: expected {want}, got {names_shown(got)} ({detail})",
                split_id=split_id)


def _check_quantization(where: str, spec: TensorSpec, got: Quantization,
                        split_id: str | None) -> None:
    """A wire tensor's ``q`` against the spec's: none where the cut is not quantized, the
    same scale (to 1e-6) and zero point where it is (an absent ``q`` means the spec's)."""
    want = spec.quantization
    if want is None:
        raise TensorError(f"{where}: tensor {spec.name!r}: the cut is not quantized "
                          f"({spec.dtype}); expected no 'q', got one", split_id=split_id)
    if not (math.isclose(want.scale, got.scale, rel_tol=1e-6)
            and want.zero_point == got.zero_point):
        raise TensorError(f"{where}: tensor {spec.name!r}: expected quantization "
                          f"[{want.scale:g}, {want.zero_point}], got [{got.scale:g}, "
                          f"{got.zero_point}]", split_id=split_id)
