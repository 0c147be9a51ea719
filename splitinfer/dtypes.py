"""Canonical dtype names shared by the manifest, the wire and the runtimes.

Names are numpy's (``"float32"``, ``"int8"`` …); ONNX element-type numbers and
onnxruntime's ``"tensor(float)"`` strings map onto them here, so no package
needs ``onnx`` to translate.
"""

from __future__ import annotations

import numpy as np

from splitinfer.errors import TensorError

__all__ = ["DTYPES", "ONNX_ELEM_TYPE", "canonical_dtype", "numpy_dtype", "from_onnx_elem_type",
           "from_ort_type"]

# canonical name -> numpy dtype
DTYPES: dict[str, np.dtype[np.generic]] = {
    name: np.dtype(name)
    for name in (
        "float32", "float16", "float64",
        "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
        "bool",
    )
}

# canonical name -> onnx.TensorProto element type number
ONNX_ELEM_TYPE: dict[str, int] = {
    "float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7,
    "bool": 9, "float16": 10, "float64": 11, "uint32": 12, "uint64": 13,
}
_FROM_ONNX = {v: k for k, v in ONNX_ELEM_TYPE.items()}

_FROM_ORT = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


def canonical_dtype(value: object) -> str:
    """Return the canonical name of a numpy dtype, a dtype name, or raise TensorError."""
    try:
        name = str(np.dtype(value).name)  # type: ignore[call-overload]
    except TypeError as exc:
        raise TensorError(f"unknown dtype {value!r}; expected one of {sorted(DTYPES)}") from exc
    if name not in DTYPES:
        raise TensorError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}")
    return name


def numpy_dtype(name: str) -> np.dtype[np.generic]:
    try:
        return DTYPES[name]
    except KeyError:
        raise TensorError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def from_onnx_elem_type(elem_type: int) -> str:
    try:
        return _FROM_ONNX[elem_type]
    except KeyError:
        raise TensorError(
            f"unsupported ONNX element type {elem_type}; expected one of {sorted(_FROM_ONNX)}"
        ) from None


def from_ort_type(ort_type: str) -> str:
    try:
        return _FROM_ORT[ort_type]
    except KeyError:
        raise TensorError(
            f"unsupported onnxruntime type {ort_type!r}; expected one of {sorted(_FROM_ORT)}"
        ) from None
