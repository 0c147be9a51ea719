"""The one error hierarchy every splitinfer package raises.

::

    SplitInferError
     ├── BadInputError (ValueError)        bad user input: file, flag, tensor name → exit 2
     │    ├── ManifestError                 manifest.json missing, unreadable or inconsistent
     │    └── TensorError                   dtype / shape / quantization does not match the contract
     ├── WireError (ValueError)            a message that cannot be decoded or is too large
     ├── VerificationError                 head→tail differs from the full model → exit 1
     ├── StartupError                      a service could not start → exit 3
     ├── RemoteError                       the far side answered with an error code
     ├── DeadlineExceeded (TimeoutError)   no answer before the request's deadline
     ├── NoSubscriberError                 the broker says nobody subscribes to the request topic
     └── TransportError (ConnectionError)  the broker connection failed or was lost

Every class carries the context it knows (``split_id``, ``device_id``, ``topic``) so that a
log line or a CLI message can name what went wrong and what was expected.
A dependency's exceptions are translated where they enter (``raise X(...) from exc``).
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "SplitInferError",
    "BadInputError",
    "ManifestError",
    "TensorError",
    "WireError",
    "VerificationError",
    "StartupError",
    "RemoteError",
    "DeadlineExceeded",
    "NoSubscriberError",
    "TransportError",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_STARTUP",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STARTUP = 3


class ErrorCode(str, enum.Enum):
    """Codes that travel back to a device inside an error result."""

    # undecodable envelope: not msgpack, truncated, beyond the decoding budget, wrong version,
    # a field missing or of the wrong type
    BAD_MESSAGE = "bad_message"
    UNKNOWN_SPLIT = "unknown_split"  # no worker artifact for this split id
    BAD_TENSOR = "bad_tensor"  # dtype / shape / size / quantization, or not the manifest's
    PAYLOAD_TOO_LARGE = "payload_too_large"
    DEADLINE_EXPIRED = "deadline_expired"  # arrived (or waited) past its deadline
    OVERLOADED = "overloaded"  # the worker's bounded queue is full
    SHUTTING_DOWN = "shutting_down"
    # a request that passed every check failed in the worker or its tail (never a malformed
    # one); the message says so without the exception's text, the worker's log has it
    INTERNAL = "internal"


class SplitInferError(Exception):
    """Base of every error splitinfer raises on purpose."""

    exit_code: int = EXIT_FAILED

    def __init__(
        self,
        message: str,
        *,
        split_id: str | None = None,
        device_id: str | None = None,
        topic: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.split_id = split_id
        self.device_id = device_id
        self.topic = topic


class BadInputError(SplitInferError, ValueError):
    """The user gave us something we cannot use; the message says what was expected."""

    exit_code = EXIT_BAD_INPUT


class ManifestError(BadInputError):
    """A manifest.json is missing, unreadable or inconsistent with its artifacts."""


class TensorError(BadInputError):
    """A tensor's dtype, shape or quantization does not match what the contract expects."""


class WireError(SplitInferError, ValueError):
    """A message on the wire cannot be decoded, or breaks a size limit.

    ``code`` is what the worker answers (``bad_message``, ``bad_tensor``,
    ``payload_too_large``); the message names the field and what was expected in msgpack
    terms, and it goes back to the device as it is: it never carries a Python class name
    or a library's own error text.
    """

    def __init__(
        self, message: str, *, code: ErrorCode = ErrorCode.BAD_MESSAGE, **context: str | None
    ) -> None:
        super().__init__(message, **context)
        self.code = code


class VerificationError(SplitInferError):
    """head→tail does not reproduce the full model within tolerance."""

    exit_code = EXIT_FAILED


class StartupError(SplitInferError):
    """A service could not start: nothing to serve, or the broker cannot be reached."""

    exit_code = EXIT_STARTUP


class RemoteError(SplitInferError):
    """The other side answered with an error result."""

    def __init__(self, code: str, message: str, **context: str | None) -> None:
        super().__init__(f"{code}: {message}", **context)
        self.code = code
        self.remote_message = message


class DeadlineExceeded(SplitInferError, TimeoutError):
    """No answer arrived before the request's deadline."""


class NoSubscriberError(SplitInferError):
    """The broker accepted a request but no one subscribes to its topic (MQTT 5 PUBACK
    reason 16, "No matching subscribers"): no worker serves it; ``.topic`` names it."""


class TransportError(SplitInferError, ConnectionError):
    """The broker connection failed or was lost."""
