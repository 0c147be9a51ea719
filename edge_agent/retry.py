"""How long an edge agent waits for an answer before re-sending: :class:`RetryBackoff`.

A pure timer policy (no I/O, no loop): the request bookkeeping
(:mod:`edge_agent.pending`) asks it for each wait and feeds it the round trips it
measures.
"""

from __future__ import annotations

import math
import random

from splitinfer.errors import BadInputError

__all__ = ["RetryBackoff", "JITTER", "jittered"]

# Every wait is jittered down by up to this share, so agents that lost their requests at
# the same moment (a broker or worker restart) do not re-send in lockstep.
JITTER = 0.25


class RetryBackoff:
    """How long to wait for an answer before re-sending: TCP's retransmission timer, simply.

    Until a round trip is measured the first wait is ``retry_s``. Each request answered at
    its first publish is a sample (Karn's rule: the answer of a re-sent request could be to
    either copy, so it is none); with ``adaptive`` the first wait then becomes
    RTO = srtt + 4 x rttvar (RFC 6298: gains 1/8 and 1/4, the first sample sets srtt = R and
    rttvar = R/2), clamped to [``retry_s``, ``retry_max_s``]: never sooner than ``retry_s``
    (a copy costs the link and the worker; a slow link that is suddenly slower must not
    fill with copies), later on a slow link or a loaded worker, which is then not sent
    copies of what it is still working on.
    The k-th re-send waits min(first x 2^k, ``retry_max_s``), less up to a quarter of jitter.
    A request answered only after re-sends for silence gives no sample but keeps its last
    wait as the first one (:meth:`backed_off`, TCP's "keep the backed-off RTO") until a
    sample comes: on a link slower than ``retry_s`` every request would otherwise be sent
    twice and never measured. ``retry_s`` = 0 turns re-sending on silence off (:meth:`wait`
    is None).
    """

    def __init__(self, retry_s: float, retry_max_s: float, *, adaptive: bool = True,
                 rng: random.Random | None = None) -> None:
        if not 0 <= retry_s <= retry_max_s:
            raise BadInputError(f"expected 0 <= retry_s <= retry_max_s, got {retry_s}, "
                                f"{retry_max_s}")
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.adaptive = adaptive
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples = 0
        self._floor = 0.0  # the backed-off first wait, until the next sample
        self._rng = rng or random.Random()  # jitter, not crypto

    def observe(self, rtt_s: float) -> None:
        """A round trip (publish to answer) of a request published once."""
        if not (math.isfinite(rtt_s) and rtt_s >= 0):
            return
        self.samples += 1
        self._floor = 0.0
        if self.srtt is None:
            self.srtt, self.rttvar = rtt_s, rtt_s / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt_s)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt_s

    def backed_off(self, resends: int) -> None:
        """A request was answered only after ``resends`` re-sends for silence."""
        if self.adaptive and resends > 0 and self.retry_s > 0:
            self._floor = max(self._floor, min(self.rto * 2.0 ** min(resends, 30),
                                               self.retry_max_s))

    @property
    def rto(self) -> float:
        """The first wait before jitter: ``retry_s``, or the clamped estimate once measured."""
        if not self.adaptive or self.retry_s == 0:
            return self.retry_s
        if self.srtt is None:
            return max(self.retry_s, self._floor)
        estimate = max(self.srtt + 4 * self.rttvar, self._floor)
        return min(max(estimate, self.retry_s), self.retry_max_s)

    def wait(self, resends: int) -> float | None:
        """Seconds to wait for an answer after the publish that followed ``resends``
        re-sends for silence (0: the first publish); None: never re-send."""
        if self.retry_s == 0:
            return None
        base = min(self.rto * 2.0 ** min(resends, 30), self.retry_max_s)
        return base * (1.0 - JITTER * self._rng.random())


def jittered(seconds: float) -> float:
    """``seconds`` less up to :data:`JITTER` of it, at random."""
    return seconds * (1.0 - JITTER * random.random())  # jitter, not crypto
