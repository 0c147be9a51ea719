"""splitinfer's shared contract: manifest, wire envelope, tensor codec, topics, errors.

Pure Python + numpy + msgpack; imports nothing else of ours, so the edge agent,
the cloud service and the splitter all agree on one definition.
"""

from __future__ import annotations

from splitinfer.errors import (
    BadInputError,
    DeadlineExceeded,
    ErrorCode,
    ManifestError,
    RemoteError,
    SplitInferError,
    StartupError,
    TensorError,
    TransportError,
    VerificationError,
    WireError,
)
from splitinfer.manifest import (
    MANIFEST_NAME,
    FileRef,
    Manifest,
    Quantization,
    TensorSpec,
    find_split_dirs,
    make_split_id,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # manifest
    "MANIFEST_NAME", "Manifest", "TensorSpec", "Quantization", "FileRef",
    "find_split_dirs", "make_split_id",
    # errors
    "ErrorCode", "SplitInferError", "BadInputError", "ManifestError", "TensorError",
    "WireError", "VerificationError", "StartupError", "RemoteError", "DeadlineExceeded",
    "TransportError",
]
