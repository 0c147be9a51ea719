"""AgentConfig: everything an edge agent needs besides its split (one ``edge run`` flag each).

Checked when built (BadInputError naming the bad value), so an agent never starts with a
setting that would fail later, mid-request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitinfer.errors import BadInputError
from splitinfer.topics import DEFAULT_PREFIX, Topics, check_level
from splitinfer.wire import DEFAULT_MAX_PAYLOAD

__all__ = ["AgentConfig"]


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything an agent needs besides its split; maps one-to-one onto ``edge run`` flags."""

    device_id: str
    broker: str = "mqtt://127.0.0.1:1883"
    prefix: str = DEFAULT_PREFIX
    timeout_s: float = 10.0  # default deadline of a call, head included
    qos: int = 1
    presence: bool = True
    # Run the head in a thread so the loop stays free (True), inline (False), or decide per
    # call (None): in a thread when other agents share this loop (their heads overlap and
    # their traffic keeps flowing), inline for a lone agent, which has nothing else for its
    # loop to do and saves two thread hops (~0.3-0.6 ms a request on a loaded 2-core box).
    head_in_thread: bool | None = None
    reconnect_min_s: float = 0.05
    reconnect_max_s: float = 2.0
    connect_timeout_s: float = 10.0
    max_payload: int = DEFAULT_MAX_PAYLOAD
    # Requests of one call in flight at once when a fixed batch splits it into several.
    chunk_concurrency: int = 8
    # After a reconnect, "no matching subscribers" is retried this long, not raised: the
    # workers may still be subscribing again to a restarted broker.
    reconnect_grace_s: float = 5.0
    # Re-send a request with no answer after retry_s (0: never re-send on silence),
    # doubling with jitter up to retry_max_s, never past its deadline; with
    # retry_adaptive the first wait follows the measured round trips (RetryBackoff).
    retry_s: float = 1.0
    retry_max_s: float = 4.0
    retry_adaptive: bool = True
    # "No matching subscribers" is re-sent, not raised, for this long after the last sign
    # of a worker (a result, or a PUBACK that matched a subscriber): a worker restarting.
    worker_grace_s: float = 10.0

    def __post_init__(self) -> None:
        check_level(self.device_id, "device id")
        Topics(self.prefix)  # raises BadInputError naming a bad prefix
        if not (self.timeout_s > 0 and self.connect_timeout_s > 0):
            raise BadInputError(f"timeouts must be > 0, got timeout_s={self.timeout_s}, "
                                f"connect_timeout_s={self.connect_timeout_s}")
        if self.qos not in (0, 1, 2):
            raise BadInputError(f"qos must be 0, 1 or 2, got {self.qos}")
        if self.chunk_concurrency < 1 or not self.reconnect_grace_s >= 0:
            raise BadInputError(f"expected chunk_concurrency >= 1 and reconnect_grace_s >= 0, "
                                f"got {self.chunk_concurrency}, {self.reconnect_grace_s}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise BadInputError("expected 0 < reconnect_min_s <= reconnect_max_s, got "
                                f"{self.reconnect_min_s}, {self.reconnect_max_s}")
        if not (math.isfinite(self.retry_s) and math.isfinite(self.retry_max_s)
                and 0 <= self.retry_s <= self.retry_max_s and self.retry_max_s > 0):
            raise BadInputError("retry: expected finite 0 <= retry_s <= retry_max_s and "
                                f"retry_max_s > 0 (seconds), got retry_s={self.retry_s}, "
                                f"retry_max_s={self.retry_max_s}")
        if not (math.isfinite(self.worker_grace_s) and self.worker_grace_s >= 0):
            raise BadInputError(f"worker_grace_s: expected a finite number of seconds >= 0, "
                                f"got {self.worker_grace_s}")
