"""systemd integration of the device service: ``sd_notify`` and journald-friendly logs.

:func:`notify` sends ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``, ``STATUS=…`` as one
datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace); it does
nothing when the variable is unset (not under systemd). The protocol is one ``sendto`` of
newline-separated ``KEY=VALUE`` lines (sd_notify(3)); the standard library's ``socket``
speaks it, so no package is added to the edge install for it. The send never blocks: a
receiver whose queue is full loses that message (a watchdog ping) instead of stalling the
event loop that sends it. :func:`watchdog_interval` is
``WatchdogSec=`` as systemd passes it (``$WATCHDOG_USEC``, for this process when
``$WATCHDOG_PID`` says so).

:func:`configure_logging`: one line per event. Under journald (``$JOURNAL_STREAM`` names
the device and inode of our stderr) each line starts with its syslog priority (``<4>`` for
a warning; journald reads it, so ``journalctl -p warning`` works) and carries no time stamp
(journald adds its own); elsewhere a time stamp and the level name. Tracebacks are folded
onto the same line.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

__all__ = ["notify", "watchdog_interval", "under_journald", "configure_logging"]

log = logging.getLogger(__name__)

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def notify(*states: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=connecting"``) to systemd; False when
    not under systemd or the socket refused it (never raises: a service must not die of
    its supervisor's absence)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    payload = "\n".join(s.replace("\n", " ") for s in states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a full receiver queue drops a ping, never blocks the loop
            sock.sendto(payload, address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", env.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds systemd waits for a ``WATCHDOG=1`` (``WatchdogSec=``), None when off."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6


def under_journald(stream: object = None, environ: dict[str, str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is the journal stream systemd connected."""
    env = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream
    journal = env.get("JOURNAL_STREAM", "")
    dev, _, ino = journal.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _OneLine(logging.Formatter):
    """Records on one line; tracebacks folded in with `` | ``."""

    def __init__(self, journal: bool) -> None:
        fmt = ("%(name)s: %(message)s" if journal
               else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\r", "").replace("\n", " | ")
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"
        return text


def configure_logging(verbose: int = 0) -> bool:
    """Root logging for the service: INFO (``-v``: DEBUG) on stderr, one line per event;
    returns whether the lines go to journald."""
    journal = under_journald()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(journal))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        handlers=[handler], force=True)
    return journal
