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
           "best_times"]

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
               warmup: int = 2) -> list[float]:
    """The best of ``rounds`` timed calls (seconds) of each of ``runs``, called in turn
    (``warmup`` untimed rounds first): noise on a busy machine hits all of them alike,
    and the best call is what each can do (a median flipped a pool-or-one-thread choice
    on a busy 2-vCPU VM: 1 thread 7.0 ms vs the pool's 5.8 one time, 4.9 another)."""
    times: list[list[float]] = [[] for _ in runs]
    for i in range(warmup + rounds):
        for which, run in enumerate(runs):
            t0 = time.perf_counter()
            run()
            if i >= warmup:
                times[which].append(time.perf_counter() - t0)
    return [min(t) if t else math.inf for t in times]
