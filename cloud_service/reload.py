"""Hot reload: the worker follows its ``--artifacts`` directory while it serves.

Every ``reload_interval_s`` the :class:`Reloader` lists the split directories
(:func:`cloud_service.registry.split_directories`: links followed, hidden directories
skipped) and takes each one's :func:`fingerprint`: the directory's inode and, for every
file in it, inode, size, mtime and ctime (a ``stat`` per file, no reading). Polling, not
inotify: it sees an atomic rename or a symbolic-link swap of a whole directory, a
Kubernetes volume update and a network file system alike, and costs a few ``stat`` calls
a second.

A directory that appeared, changed or went is acted on once its fingerprint has stayed
the same for ``reload_settle_s`` (:class:`ChangeDetector`, pure, clock injected): a copy
still being written, or the instant between moving the old directory aside and the new
one in, is never acted on. Then:

* **appeared or changed**: the new tail is opened in a thread (manifest checked, the tail's
  sha256 against the manifest, an onnxruntime session made, its inputs and outputs
  checked against the manifest) while the old version keeps serving; then, on the event
  loop with nothing in between, the registry swaps it in (:meth:`Registry.swap`). A
  request accepted before the swap is run and answered by the version that accepted it
  (:attr:`cloud_service.worker.Job.tail`; two versions never share a batch); the old
  session is dropped once it has answered all of them (``tails_retiring``).
* **gone**: the split is removed; requests already accepted are answered, later ones get
  the usual ``unknown_split`` answer.
* **a new version that cannot be loaded**: logged as an error naming the directory and
  why, counted in ``reload_failures``, the previous version (if any) keeps serving; the
  directory is listed by ``/readyz``. It is tried again when it changes.
* **a second directory with a split id already served** (``cp -r live live-v2``): refused
  as above while both are there; when the first goes (``rm -r live``), the second serves
  that split in the same swap, so no request finds it missing. Any other refused
  directory is tried again whenever a split stops being served.

Readiness (:func:`readiness_problems`): every split directory found has a tail serving it
(the previous version counts), none is still loading for the first time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloud_service.metrics import Metrics
from cloud_service.registry import Registry, Tail, split_directories
from splitinfer.errors import SplitInferError

__all__ = ["Fingerprint", "fingerprint", "scan", "Change", "ChangeDetector", "Reloader",
           "readiness_problems"]

log = logging.getLogger(__name__)

# (file name, inode, size, mtime ns, ctime ns) per file; "" is the directory itself
Fingerprint = tuple[tuple[str, int, int, int, int], ...]


def fingerprint(directory: str | Path) -> Fingerprint | None:
    """What identifies the contents of one split directory; None when it cannot be read
    (gone). Files only, links followed; a rename into place changes the inode and ctime."""
    try:
        top = os.stat(directory)
        entries = [("", top.st_ino, 0, 0, 0)]
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except OSError:  # removed while listing: seen at the next scan
                    continue
                entries.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns,
                                st.st_ctime_ns))
    except OSError:
        return None
    return tuple(sorted(entries))


def scan(root: str | Path) -> dict[str, Fingerprint] | None:
    """Every split directory under ``root`` and its fingerprint; None when ``root`` itself
    is not a readable directory (then nothing is concluded: no split is removed because
    a mount went away for a moment)."""
    root = Path(root)
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        return None
    seen: dict[str, Fingerprint] = {}
    for directory in split_directories(root):
        fp = fingerprint(directory)
        if fp is not None:
            seen[str(directory)] = fp
    return seen


@dataclass(frozen=True)
class Change:
    """A split directory whose new state has settled: ``fingerprint`` None = gone."""

    directory: str
    fingerprint: Fingerprint | None

    @property
    def gone(self) -> bool:
        return self.fingerprint is None


class ChangeDetector:
    """Which split directories changed and then stayed unchanged for ``settle_s``.

    ``known`` is the state applied (served or failed); :meth:`observe` takes a scan and
    returns the settled changes, which the caller applies and confirms with :meth:`done`
    (until then they are returned again). Pure: no file system, the clock injected.
    """

    def __init__(self, known: Mapping[str, Fingerprint], *, settle_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if settle_s < 0:
            raise ValueError(f"settle_s = {settle_s!r}: expected >= 0")
        self.known: dict[str, Fingerprint] = dict(known)
        self.settle_s = settle_s
        self._clock = clock
        # directory -> (fingerprint seen, first seen at): changed, not yet settled
        self._pending: dict[str, tuple[Fingerprint | None, float]] = {}

    @property
    def pending(self) -> frozenset[str]:
        """Directories seen changing (or appearing, or going), not acted on yet."""
        return frozenset(self._pending)

    def observe(self, seen: Mapping[str, Fingerprint]) -> list[Change]:
        now = self._clock()
        settled: list[Change] = []
        for directory in sorted(set(self.known) | set(seen) | set(self._pending)):
            current = seen.get(directory)
            if current == self.known.get(directory):
                self._pending.pop(directory, None)  # back as it was: nothing to do
                continue
            first = self._pending.get(directory)
            if first is None or first[0] != current:
                self._pending[directory] = (current, now)  # (still) changing
                continue
            if now - first[1] >= self.settle_s:
                settled.append(Change(directory, current))
        return settled

    def forget(self, directory: str) -> None:
        """Treat ``directory`` as never applied: as it stands, it is a change again."""
        self.known.pop(directory, None)

    def done(self, change: Change) -> None:
        """``change`` was applied, or failed: its state is the known one now."""
        self._pending.pop(change.directory, None)
        if change.fingerprint is None:
            self.known.pop(change.directory, None)
        else:
            self.known[change.directory] = change.fingerprint


def readiness_problems(registry: Registry, *, loading: Sequence[str] = ()) -> list[str]:
    """Why the worker is not ready, one line per split directory: one that failed to load
    and has no earlier version serving, or one seen for the first time and still loading.
    Empty: every split directory found has a tail serving it."""
    served = registry.by_directory()
    problems = [f"{directory}: not served: {why}"
                for directory, why in sorted(registry.failed.items())
                if directory not in served]
    problems += [f"{directory}: loading" for directory in sorted(loading)
                 if directory not in served and directory not in registry.failed
                 and directory not in registry.edge_only]
    return problems


class Reloader:
    """Keeps ``registry`` in step with the split directories under ``root``.

    ``load(directory)`` opens a split directory's tail (None: edge-only, nothing to
    serve) and raises SplitInferError when it cannot; it runs in a thread. :meth:`tick`
    does one scan and applies what settled; :meth:`run` ticks forever.
    """

    def __init__(self, root: str | Path, registry: Registry, metrics: Metrics, *,
                 load: Callable[[Path], Tail | None],
                 known: Mapping[str, Fingerprint],
                 interval_s: float = 1.0, settle_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 scanner: Callable[[Path], dict[str, Fingerprint] | None] = scan) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s = {interval_s!r}: expected > 0")
        self.root = Path(root)
        self.registry = registry
        self.metrics = metrics
        self.interval_s = interval_s
        self.detector = ChangeDetector(known, settle_s=settle_s, clock=clock)
        self._load = load
        self._scan = scanner
        self._clock = clock
        self._retiring: list[Tail] = []
        # directory -> a loaded tail refused because its split id is served from another
        # directory; it takes over, in the same swap, when that directory goes
        self._standby: dict[str, Tail] = {}
        self._root_missing = False
        self.last_load_s: float | None = None  # the last new version's load time
        metrics.reload_pending = self.pending_count
        metrics.tails_retiring = lambda: len(self._retiring)
        metrics.splits_now = lambda: frozenset(self.registry)

    # --- what /readyz and /metrics read --------------------------------------------------

    def problems(self) -> list[str]:
        return readiness_problems(self.registry, loading=sorted(self.detector.pending))

    def pending_count(self) -> int:
        """Split directories whose newest version is not served: failed, or changed and
        not loaded yet."""
        return len(set(self.registry.failed) | set(self.detector.pending))

    def stale(self) -> list[str]:
        """Directories served by an earlier version because the newest one failed."""
        served = self.registry.by_directory()
        return [f"{d}: serving the previous version; the new one failed: {why}"
                for d, why in sorted(self.registry.failed.items()) if d in served]

    @property
    def retiring(self) -> int:
        return len(self._retiring)

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the worker serving
                log.exception("hot reload: scan of %s failed; trying again", self.root)

    async def tick(self) -> list[Change]:
        """Scan once and apply the changes that settled; return them."""
        self._retire()
        seen = await asyncio.to_thread(self._scan, self.root)
        if seen is None:
            if not self._root_missing:
                log.warning("hot reload: artifacts directory %s cannot be read; serving what "
                            "is loaded until it is back", self.root)
            self._root_missing = True
            return []
        if self._root_missing:
            log.info("hot reload: artifacts directory %s is back", self.root)
            self._root_missing = False
        changes = self.detector.observe(seen)
        if changes:
            await self.apply(changes)
        return changes

    async def apply(self, changes: Sequence[Change]) -> None:
        """Load the new versions (one at a time, in a thread, the old ones serving), then
        swap them all in at once on the loop."""
        loaded: dict[str, Tail | Exception | None] = {}
        for change in changes:
            if change.gone:
                continue
            started = self._clock()
            try:
                loaded[change.directory] = await asyncio.to_thread(
                    self._load, Path(change.directory))
            except SplitInferError as exc:
                loaded[change.directory] = exc
            except Exception as exc:  # e.g. a file removed while being read: tried again
                loaded[change.directory] = exc  # when the directory changes again
                log.debug("hot reload: loading %s failed", change.directory, exc_info=True)
            self.last_load_s = self._clock() - started
        self._swap(changes, loaded)  # no await from here on: atomic for the requests
        self._retire()

    def _swap(self, changes: Sequence[Change],
              loaded: Mapping[str, Tail | Exception | None]) -> None:
        registry = self.registry
        served = registry.by_directory()
        remove: list[str] = []
        put: list[Tail] = []
        retire: list[Tail] = []
        # split ids this round frees: their directory went, or now holds another split
        freed = set()
        for change in changes:
            old = served.get(change.directory)
            new = loaded.get(change.directory)
            if old is not None and (change.gone or new is None or (
                    isinstance(new, Tail) and new.split_id != old.split_id)):
                freed.add(old.split_id)
        claimed: dict[str, str] = {}  # split id -> directory, this round
        for change in changes:
            directory = change.directory
            old = served.get(directory)
            self._standby.pop(directory, None)  # decided again below
            if change.gone:
                registry.failed.pop(directory, None)
                registry.edge_only.discard(directory)
                if old is not None:
                    remove.append(old.split_id)
                    retire.append(old)
                    self.metrics.reloads += 1
                    log.info("hot reload: split %s removed (%s is gone); %d request(s) in "
                             "flight are answered by it", old.split_id, directory,
                             old.in_flight)
                self.detector.done(change)
                continue
            new = loaded[directory]
            if isinstance(new, SplitInferError):
                self._failed(directory, str(new), old)
            elif isinstance(new, Exception):
                self._failed(directory, f"{type(new).__name__}: {new}", old)
            elif new is None:  # edge-only now: nothing to serve
                registry.failed.pop(directory, None)
                registry.edge_only.add(directory)
                if old is not None:
                    remove.append(old.split_id)
                    retire.append(old)
                    self.metrics.reloads += 1
            else:
                owner = registry.get(new.split_id)
                other = claimed.get(new.split_id) or (
                    str(owner.directory) if owner is not None and str(owner.directory)
                    != directory and new.split_id not in freed else None)
                if other is not None:
                    self._failed(directory, f"split {new.split_id} is already served from "
                                 f"{other}; one split id, one directory", old)
                    if old is None:
                        self._standby[directory] = new
                else:
                    claimed[new.split_id] = directory
                    registry.failed.pop(directory, None)
                    registry.edge_only.discard(directory)
                    if old is not None:
                        retire.append(old)
                        if old.split_id != new.split_id:
                            remove.append(old.split_id)
                    put.append(new)
                    self.metrics.reloads += 1
                    log.info("hot reload: split %s %s from %s (load %.0f ms%s)",
                             new.split_id, "replaced" if old is not None else "added",
                             directory, 1e3 * (self.last_load_s or 0.0),
                             f"; the old version answers its {old.in_flight} request(s) "
                             "in flight" if old is not None else "")
            self.detector.done(change)
        remove = [split_id for split_id in remove if split_id not in claimed]
        if remove:
            self._take_over(remove, put)
        registry.swap(put=put, remove=remove)
        self.metrics.splits = self.metrics.splits | frozenset(registry)
        self._retiring += [tail for tail in retire if tail not in put]
        if not registry:
            log.warning("hot reload: no split left to serve under %s; every request is "
                        "answered unknown_split until one is back", self.root)

    def _take_over(self, remove: list[str], put: list[Tail]) -> None:
        """Split ids this swap stops serving: a directory refused earlier because it held
        the same split id (``cp -r a b`` before ``rm -r a``) serves it now, in the same
        swap, instead of staying refused while nothing serves that split. A refused
        directory with no tail at hand (a duplicate found at start-up) is loaded again."""
        for directory, tail in sorted(self._standby.items()):
            if tail.split_id in remove:
                remove.remove(tail.split_id)
                put.append(tail)
                del self._standby[directory]
                self.registry.failed.pop(directory, None)
                self.metrics.reloads += 1
                log.info("hot reload: split %s now served from %s (its other directory "
                         "went)", tail.split_id, directory)
        for directory in list(self.registry.failed):
            if directory not in self._standby:
                self.detector.forget(directory)

    def _failed(self, directory: str, why: str, old: Tail | None) -> None:
        self.registry.failed[directory] = why
        self.metrics.reload_failures += 1
        if old is not None:
            log.error("hot reload: the new version in %s cannot be served (%s); still serving "
                      "the previous version of split %s", directory, why, old.split_id)
        else:
            log.error("hot reload: %s cannot be served (%s); not serving it", directory, why)

    def _retire(self) -> None:
        """Drop the replaced tails that have answered every request they accepted; their
        onnxruntime sessions go with the last reference."""
        still = []
        for tail in self._retiring:
            if tail.in_flight > 0:
                still.append(tail)
            else:
                log.debug("hot reload: a replaced version of split %s (from %s) retired",
                          tail.split_id, tail.directory)
        self._retiring = still
