"""onnxruntime session settings every side must share, so that head → tail is bit-exact.

A split is only as exact as the two halves run the same arithmetic as the whole model.
onnxruntime's graph optimiser decides, per session, how QDQ (QuantizeLinear →
DequantizeLinear) pairs become integer kernels; where the halves and the whole model decide
differently, an int8 cut is off by quantization steps. Since onnxruntime 1.32 on x86 the
default rewrites int8 Q→DQ pairs to uint8 before fusing them; a tail whose input *is* the
int8 cut has no such pair, so its first op falls back to float while the whole model's ran
in integers (digits CNN: 1.35 on logits of scale 19.6; ResNet-18: 0.10). With
``session.qdqisint8allowed = 1`` the int8 pairs stay int8 on both sides, and every int8 cut
is exact again.

The settings are plain strings (no onnxruntime import here): each side applies them to its
own ``SessionOptions`` with :func:`apply`. The splitter's verification, the edge agent's
head, the cloud worker's tail and the simulators' reference runs all do, so "the unsplit
model's answer" means the same thing everywhere.
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = ["SESSION_CONFIG", "apply"]

SESSION_CONFIG: dict[str, str] = {
    "session.qdqisint8allowed": "1",
}

_Options = TypeVar("_Options")


def apply(options: _Options) -> _Options:
    """Add :data:`SESSION_CONFIG` to an ``onnxruntime.SessionOptions``; return it."""
    add: Any = getattr(options, "add_session_config_entry")  # noqa: B009  # duck-typed
    for key, value in SESSION_CONFIG.items():
        add(key, value)
    return options
