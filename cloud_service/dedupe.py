"""Idempotent requests: a retried request id is answered once, never run twice.

A device re-sends a request (same id) when it heard nothing back or the broker said
"no matching subscribers"; the retry may reach this worker while the first copy is
still queued, or after it was answered. The key is ``(device id, request id)``, the
device id taken from the **request topic** (which the broker ACL binds to the sender),
so one device can never touch another's entries.

* a key still queued or running is *pending*: a duplicate is dropped (the one answer
  covers both copies);
* a key answered with a result is kept in :class:`ResultCache`: a duplicate gets the same
  payload again. Bounded by entries **and** bytes; an entry expires at its request's
  deadline plus :data:`EXPIRY_MARGIN_S` (after that the device has given up on it), or
  :data:`NO_DEADLINE_TTL_S` after the answer for a request without a deadline.

Error answers are not cached: they are cheap to reproduce, and the transient ones
(``overloaded``, ``shutting_down``) should be tried again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Key", "ResultCache", "EXPIRY_MARGIN_S", "NO_DEADLINE_TTL_S", "DEFAULT_MAX_BYTES"]

Key = tuple[str, str]  # (device id from the request topic, request id)

# A retry sent just before its deadline may arrive a little after it.
EXPIRY_MARGIN_S = 5.0
NO_DEADLINE_TTL_S = 60.0
DEFAULT_MAX_BYTES = 64 * 2**20


@dataclass(frozen=True, slots=True)
class _Entry:
    payload: bytes
    expires: float  # the clock's seconds (unix time by default, like the deadlines)


class ResultCache:
    """Recent answers by key, oldest evicted first; see the module docstring."""

    def __init__(self, max_entries: int, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 clock: Callable[[], float] = time.time) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"max_entries = {max_entries!r}, max_bytes = {max_bytes!r}: "
                             "expected integers >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, key: Key, payload: bytes, deadline: float) -> bool:
        """Keep ``payload`` for ``key``; False when it cannot be kept (too big, off)."""
        size = len(payload)
        if self.max_entries == 0 or size > self.max_bytes:
            return False
        now = self._clock()
        expires = deadline + EXPIRY_MARGIN_S if deadline > 0 else now + NO_DEADLINE_TTL_S
        if expires <= now:
            return False
        self._drop(key)
        self._entries[key] = _Entry(payload, expires)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._evict_oldest()
        # Expired entries at the old end go now rather than wait to be pushed out.
        while self._entries:
            oldest_key, oldest = next(iter(self._entries.items()))
            if oldest.expires > now:
                break
            self._drop(oldest_key)
        return True

    def get(self, key: Key) -> bytes | None:
        """The answer kept for ``key``, or None (never answered, evicted or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._drop(key)
            return None
        return entry.payload

    def _evict_oldest(self) -> None:
        key = next(iter(self._entries))
        self._drop(key)

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.payload)
