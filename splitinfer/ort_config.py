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

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["SESSION_CONFIG", "SPINNING", "POOL_GAIN", "apply", "usable_cpus", "pool_threads",
           "best_times", "calibration_times"]

SESSION_CONFIG: dict[str, str] = {
    "session.qdqisint8allowed": "1",
}

# When onnxruntime's pool threads spin for work: "run" — while a run lasts, stopping when it
# returns (session.force_spinning_stop); "always" — onnxruntime's own default, also for
# tens of ms after every run (a core busy meanwhile); "off" — never (every op of a run
# wakes them). The agent's and the worker's default is "run": measured on a 2-vCPU VM
# (splitinfer bench overhead, MobileNetV2, one request at a time) "off" left the head
# 0.8-1.4 ms over its best and "always" made the agent and the worker, sharing the cores,
# slow each other down.
SPINNING = ("run", "always", "off")

# threads = 0 (the default) on either side: one thread instead of a pool of all usable CPUs
# unless the pool runs one sample this much faster (best_times). A pool wakes its threads
# for every run: on a small model one thread is faster (the digits CNN's head: 0.32 ms on
# one thread, 0.53 on two spinning, 0.39 on two sleeping, runs 5 ms apart; its tail 0.084
# vs 0.100 ms), and a 1,000-device fleet of such requests kept a worker's spinning pool
# 0.68 cores busy (p99 1,004 ms against 38 ms with one thread, bench/bench_fleet.py).
POOL_GAIN = 1.2
# How the pool-or-one-thread choice is measured (calibration_times): groups of rounds,
# and, where one thread would win on a run long enough for the choice to cost
# milliseconds, up to four more looks half a second apart (at most 2 s more at load).
# On a 2-vCPU VM the second vCPU sometimes gives no parallel speed-up for up to ~1.5 s
# at a time, every pool at once (fresh MobileNetV2 tail sessions 0.5 s apart: a 2-thread
# run at 4.6 ms in such spells against 2.6-3.3 otherwise, 4.8 on one thread); a choice
# made then would run every request of the process's life on one thread.
CALIBRATION_ROUNDS = 5
CALIBRATION_GROUPS = 3
CALIBRATION_GAP_S = 0.05
CALIBRATION_RECHECKS = 4
CALIBRATION_RECHECK_GAP_S = 0.5
CALIBRATION_RECHECK_MIN_S = 1e-3  # one-thread runs shorter than this are not re-checked

_Options = TypeVar("_Options")


def apply(options: _Options) -> _Options:
    """Add :data:`SESSION_CONFIG` to an ``onnxruntime.SessionOptions``; return it."""
    add: Any = getattr(options, "add_session_config_entry")  # noqa: B009  # duck-typed
    for key, value in SESSION_CONFIG.items():
        add(key, value)
    return options


def usable_cpus(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    A container limited to 2 CPUs on a 64-core node sees 64 in ``os.cpu_count()`` (and
    in its affinity mask); its quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``) says 2, rounded up.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    root = Path(cgroup_root)
    quota: float | None = None
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, ValueError, ZeroDivisionError):
        try:
            q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            if q > 0 and period > 0:
                quota = q / period
        except (OSError, ValueError):
            pass
    if quota is not None and quota > 0:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def pool_threads(threads: int | None) -> int:
    """The intra-op thread count to give onnxruntime for ``threads`` (0 or None: all
    :func:`usable_cpus`).

    Always an explicit number: with 0, onnxruntime picks one thread per physical core
    *and pins each to its core*. Two processes doing so on one machine (an agent and a
    worker, two workers, a worker beside the broker's host) fight over the same pinned
    cores, and neither can move away: the MobileNetV2 tail of ``splitinfer bench
    overhead`` ran 7.8 ms in the worker with onnxruntime's default pool against 4.9 ms
    with the same two threads set explicitly (2-vCPU VM, head and tail on default pools).
    """
    if threads is None or threads <= 0:
        return usable_cpus()
    return threads


def best_times(runs: Sequence[Callable[[], object]], *, rounds: int = 7,
               warmup: int = 2, groups: int = 1, gap_s: float = 0.0) -> list[float]:
    """The best of ``rounds`` timed calls (seconds) of each of ``runs``, called in turn
    (``warmup`` untimed rounds first): noise on a busy machine hits all of them alike,
    and the best call is what each can do (a median flipped a pool-or-one-thread choice
    on a busy 2-vCPU VM: 1 thread 7.0 ms vs the pool's 5.8 one time, 4.9 another).

    ``groups`` > 1 repeats that ``groups`` times, ``gap_s`` apart, each after one untimed
    round: a pool that gets no parallel speed-up for a moment (on such a VM the second
    vCPU is sometimes away: a 2-thread MobileNetV2 tail at 4.6 ms against 3.3, beside 4.9
    on one thread) has its best measured in another group."""
    times: list[list[float]] = [[] for _ in runs]
    for group in range(max(1, groups)):
        if group:
            time.sleep(gap_s)
        for i in range((warmup if not group else 1) + rounds):
            for which, run in enumerate(runs):
                t0 = time.perf_counter()
                run()
                if i >= (warmup if not group else 1):
                    times[which].append(time.perf_counter() - t0)
    return [min(t) if t else math.inf for t in times]


def calibration_times(pool: Callable[[], object], single: Callable[[], object],
                      ) -> tuple[float, float]:
    """(pool, one thread): the best one-sample times the POOL_GAIN choice compares
    (best_times in :data:`CALIBRATION_GROUPS` groups), looked at again up to
    :data:`CALIBRATION_RECHECKS` times while one thread would win a run of at least
    :data:`CALIBRATION_RECHECK_MIN_S`; the best of every look."""
    def look() -> tuple[float, float]:
        p, s = best_times((pool, single), rounds=CALIBRATION_ROUNDS,
                          groups=CALIBRATION_GROUPS, gap_s=CALIBRATION_GAP_S)
        return p, s

    pool_s, single_s = look()
    for _ in range(CALIBRATION_RECHECKS):
        if single_s > pool_s * POOL_GAIN or single_s < CALIBRATION_RECHECK_MIN_S:
            break
        time.sleep(CALIBRATION_RECHECK_GAP_S)
        again_pool, again_single = look()
        pool_s, single_s = min(pool_s, again_pool), min(single_s, again_single)
    return pool_s, single_s
