"""A device id that survives restarts: configured, or derived once and kept in a state dir.

``splitinfer edge run`` takes ``--device-id`` / ``SPLITINFER_DEVICE_ID`` or makes up
``edge-<hostname>-<random>`` per process (:func:`edge_agent.sync.default_device_id`): fine
for a one-shot run, wrong for a daemon, whose id names its broker ACL entry and its
retained presence topic (a new id per start leaves one retained ``offline`` behind each
time). :func:`stable_device_id` gives the configured id when there is one; otherwise it
reads ``STATE_DIR/device_id``, and when that file is absent derives
``edge-<hostname>-<8 random hex>`` once and writes it there (atomically, so a crash never
leaves half an id, and two starts at once agree on one). Copy an SD card image only before
its first start, or delete the file in the copy: two devices with one id take each other's
connection.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

from splitinfer.errors import BadInputError, StartupError
from splitinfer.topics import check_level, topic_name

__all__ = ["DEVICE_ID_FILE", "stable_device_id", "derive_device_id"]

DEVICE_ID_FILE = "device_id"


def derive_device_id() -> str:
    """``edge-<hostname>-<8 random hex>``, as a portable topic level."""
    return topic_name(f"edge-{socket.gethostname()}-{uuid.uuid4().hex[:8]}")


def stable_device_id(configured: str | None, state_dir: str | Path) -> tuple[str, str]:
    """The device id and how it was found: ``"configured"``, ``"persisted"`` (read from
    ``state_dir/device_id``) or ``"new"`` (derived now and written there)."""
    if configured:
        return check_level(configured, "device id"), "configured"
    path = Path(state_dir) / DEVICE_ID_FILE
    try:
        stored = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        stored = None
    except OSError as exc:
        raise StartupError(f"cannot read the device id from {path}: {exc}; fix its "
                           "permissions or set device_id") from exc
    if stored is not None:
        try:
            return check_level(stored, f"device id in {path}"), "persisted"
        except BadInputError as exc:
            raise BadInputError(f"{exc}; delete {path} to derive a new one, or set "
                                "device_id") from None
    device_id = derive_device_id()
    if not _create_once(path, device_id + "\n"):  # another start wrote one first: use it
        return stable_device_id(None, state_dir)
    return device_id, "new"


def _create_once(path: Path, text: str) -> bool:
    """Write ``path`` whole, only if it does not exist yet (False when it does). Linked into
    place rather than renamed over, so two starts racing on one state dir agree on one id;
    the directory is synced too, or a power cut soon after the first start (a Pi's usual
    way to stop) could lose the new entry and the next start would derive another id."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".device_id.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this file system (vfat): renamed instead
                os.replace(tmp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot keep the device id in {path}: {exc}; give the service a "
                           "writable state_dir (systemd: StateDirectory=splitinfer) or set "
                           "device_id") from exc
