"""Is kernel bandwidth shaping (TBF/HTB in a network namespace) available here?

The user-space proxy (:mod:`simulators.shaper`) is the emulation that always works. Where
we run as root with ``ip`` and ``tc`` and the kernel has the ``tbf`` qdisc, bandwidth could
also be shaped by the kernel inside a throwaway network namespace. :func:`tbf_available`
(and :func:`qdisc_available` for ``htb``) probe that once per process: create a namespace,
add the qdisc on its loopback, delete the namespace. Nothing here uses it yet: the proxy
models bandwidth per connection, which one qdisc per namespace cannot do for N devices
sharing a listener. (netem, for delay and loss, is absent from this kernel.)
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import uuid

__all__ = ["tbf_available", "qdisc_available"]


def _run(*args: str) -> bool:
    try:
        return subprocess.run(args, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_QDISC_ARGS = {
    "tbf": (("root", "tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms"),),
    "htb": (("root", "handle", "1:", "htb", "default", "10"),),
}


@functools.cache
def qdisc_available(kind: str = "tbf") -> bool:
    """True when a netns whose loopback carries a ``kind`` qdisc can be made here."""
    ip, tc = shutil.which("ip"), shutil.which("tc")
    if kind not in _QDISC_ARGS or os.geteuid() != 0 or not ip or not tc:
        return False
    ns = f"splitinfer-probe-{uuid.uuid4().hex[:8]}"
    if not _run(ip, "netns", "add", ns):
        return False
    try:
        return _run(ip, "-n", ns, "link", "set", "lo", "up") and all(
            _run(tc, "-n", ns, "qdisc", "add", "dev", "lo", *args) for args in _QDISC_ARGS[kind])
    finally:
        _run(ip, "netns", "delete", ns)


def tbf_available() -> bool:
    """True when the kernel can shape bandwidth with TBF in a throwaway network namespace."""
    return qdisc_available("tbf")
