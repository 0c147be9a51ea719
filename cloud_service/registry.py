"""Split artifacts on the worker: one onnxruntime session per tail, found by split id.

:meth:`Registry.load` reads every split directory under ``--artifacts`` (as written by
``splitinfer split``), checks each tail against its manifest and opens it. A broken split
is logged and skipped; a worker with nothing to serve does not start.
:func:`split_directories` is what counts as a split directory there (symbolic links
followed, hidden directories skipped: a staging copy ``.digits.new`` is not served); the
hot reload (:mod:`cloud_service.reload`) swaps tails in and out with :meth:`Registry.swap`.
:meth:`Tail.prepare` checks a request's tensors against ``manifest.cut`` ("expected X,
got Y", :func:`splitinfer.tensors.check_tensors`, the edge agent's own check) before it
may join a batch.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitinfer import ort_config
from splitinfer.dtypes import from_ort_type
from splitinfer.errors import (
    BadInputError,
    ManifestError,
    SplitInferError,
    StartupError,
    TensorError,
)
from splitinfer.imagecodec import ImageCodec
from splitinfer.manifest import MANIFEST_NAME, Manifest, TensorSpec, sha256_file
from splitinfer.tensors import check_tensors
from splitinfer.wire import Envelope

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["Tail", "Prepared", "Registry", "session_options", "default_providers",
           "SPINNING", "split_directories", "open_directory"]

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Prepared:
    """A request's cut tensors in the tail's input order, checked against the manifest."""

    feeds: tuple[Array, ...]
    samples: int
    # Requests batch together only when every tensor has the same per-sample shape.
    key: tuple[tuple[int, ...], ...]


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


_cuda_preloaded = False


def _preload_cuda() -> None:
    """Load the CUDA/cuDNN libraries pip installed (``onnxruntime-gpu[cuda,cudnn]``).

    They live in site-packages, off the loader's path; onnxruntime's ``preload_dlls``
    finds them there (and is a no-op where the system already provides them).
    """
    global _cuda_preloaded
    if _cuda_preloaded:
        return
    _cuda_preloaded = True
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # the session start reports what is really missing
            log.warning("onnxruntime.preload_dlls() failed: %s", exc)


# onnxruntime pool threads: spin while a run lasts ("run"), also after it ("always",
# onnxruntime's own default), or never ("off").
SPINNING = ort_config.SPINNING


# threads = 0: one thread unless a pool pays this much (splitinfer.ort_config.POOL_GAIN).
POOL_GAIN = ort_config.POOL_GAIN


def _fewest_threads(session: Any, path: Path, manifest: Manifest, spinning: str,
                    providers: Sequence[str]) -> Any:
    """``session`` (a pool of all usable CPUs) or a one-thread session of the same
    tail, whichever runs one sample faster by :data:`POOL_GAIN`; measured here and now
    on zeros of the cut's shape. Shapes with unknown dimensions keep the default."""
    import onnxruntime as ort

    if ort_config.usable_cpus() < 2:
        return session
    feeds: dict[str, Array] = {}
    for spec in manifest.cut:
        dims = spec.shape[1:]
        if not all(isinstance(d, int) for d in dims):
            return session
        feeds[spec.name] = np.zeros((1, *dims), dtype=spec.dtype)
    try:
        single = ort.InferenceSession(str(path), sess_options=session_options(
            1, spinning=spinning), providers=list(providers))

        pool_s, single_s = ort_config.calibration_times(
            lambda: session.run(None, feeds), lambda: single.run(None, feeds))
    except Exception as exc:  # a tail that cannot run on zeros still serves as before
        log.debug("split %s: thread calibration skipped: %r", manifest.split_id, exc)
        return session
    chosen = single if single_s <= pool_s * POOL_GAIN else session
    pool = ort_config.pool_threads(0)
    log.info("split %s: tail on %s (one sample: 1 thread %.3f ms, %d threads %.3f ms)",
             manifest.split_id, "1 thread" if chosen is single else f"{pool} threads",
             single_s * 1e3, pool, pool_s * 1e3)
    return chosen


def session_options(threads: int = 0, *, spinning: str | bool = "off") -> ort.SessionOptions:
    """Options for a tail session; the benchmarks' own-settings floors use the same.

    ``threads``: intra-op threads, 0 = one per usable CPU, set explicitly (never
    onnxruntime's own default, which pins its threads to cores:
    :func:`splitinfer.ort_config.pool_threads`).
    ``spinning`` (:data:`SPINNING`; True / False mean "always" / "off"); this function's
    default is "off", the worker's (``Config.spinning``) and the agent's "run". Measured
    with ``splitinfer bench overhead`` (MobileNetV2 tail, one request at a time, agent,
    broker and worker on one 2-vCPU VM; tail p50 in the worker against plain onnxruntime
    at its best beside it):

    * "off": pool threads sleep when out of work, so every op of a run wakes them:
      1.3-2.5 ms over the best, no CPU burned between requests.
    * "run": they spin while a run lasts and stop when it returns
      (``session.force_spinning_stop``): 0.3-1.9 ms over the best, nothing burned after.
    * "always": onnxruntime's own default, they keep spinning tens of ms after each run,
      so the pool never sleeps while requests keep coming — at the cost of a core after
      every request, taken from the loop, the broker and (on a shared machine) the next
      head: e2e/floor 1.37-1.64 against 1.31-1.43 with "run".
    """
    import onnxruntime as ort

    if isinstance(spinning, bool):
        spinning = "always" if spinning else "off"
    if spinning not in SPINNING:
        raise BadInputError(f"spinning {spinning!r}: expected one of {SPINNING}")
    opts = ort_config.apply(ort.SessionOptions())  # int8 cuts bit-exact (see ort_config)
    opts.intra_op_num_threads = ort_config.pool_threads(threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning",
                                  "0" if spinning == "off" else "1")
    if spinning == "run":
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


_versions = itertools.count(1)


class Tail:
    """One split's tail: its manifest, its session and the request checks.

    ``version`` is unique per opened tail (a reloaded split gets a new one: requests of
    two versions never share a batch); ``in_flight`` counts the requests the worker
    accepted for this tail and has not answered yet (on the event loop), so a replaced
    version is retired only once it is 0.
    """

    def __init__(self, manifest: Manifest, directory: Path, session: ort.InferenceSession
                 ) -> None:
        self.manifest = manifest
        self.directory = directory
        self.session = session
        self.version = next(_versions)
        self.in_flight = 0
        self.sample_s = 0.0  # moving average of a run's seconds per sample (observe_run)
        self.specs: tuple[TensorSpec, ...] = manifest.cut
        self.input_names = tuple(spec.name for spec in manifest.cut)
        self.output_names = tuple(spec.name for spec in manifest.outputs)
        self.output_specs = {spec.name: spec for spec in manifest.outputs}
        self.fixed_batch = self._check_session()
        # Cleared when a batched run returns outputs whose first dim is not the batch;
        # from then on this tail runs one request at a time.
        # An output whose first dimension is a fixed number cannot carry a dynamic batch
        # first (e.g. [classes, N]); the run-time check alone is fooled when a batch
        # happens to have exactly that many samples.
        self.batchable = self.fixed_batch is None and not any(
            spec.shape and isinstance(spec.shape[0], int) for spec in manifest.outputs)

    @property
    def split_id(self) -> str:
        return self.manifest.split_id

    def observe_run(self, seconds: float, samples: int) -> None:
        """Count a run of ``samples`` that took ``seconds`` in :attr:`sample_s`."""
        if samples <= 0 or seconds < 0:
            return
        per = seconds / samples
        self.sample_s = per if self.sample_s == 0.0 else 0.8 * self.sample_s + 0.2 * per

    @classmethod
    def open(cls, directory: str | Path, *, threads: int = 0,
             providers: Sequence[str] = (), verify_sha256: bool = True,
             spinning: str = "off") -> Tail:
        """Load ``directory``'s manifest and tail; ManifestError says what does not fit."""
        import onnxruntime as ort

        directory = Path(directory)
        manifest = Manifest.load(directory)
        ref = manifest.tail
        if ref is None:
            raise ManifestError(f"{directory}: split {manifest.split_id} has no tail (an "
                                "edge-only split runs wholly on the device); nothing to "
                                "serve", split_id=manifest.split_id)
        path = manifest.resolve(directory, "tail")
        if not path.is_file():
            raise ManifestError(f"{directory}: tail file {ref.path!r} is missing; "
                                "re-run 'splitinfer split'", split_id=manifest.split_id)
        if verify_sha256 and ref.sha256:
            digest = sha256_file(path)
            if digest != ref.sha256:
                raise ManifestError(
                    f"{path}: sha256 {digest[:12]}… does not match the manifest's "
                    f"{ref.sha256[:12]}…; the tail was changed after 'splitinfer "
                    "split' — re-run it", split_id=manifest.split_id)
        wanted = list(providers) or default_providers()
        available = ort.get_available_providers()
        unknown = [p for p in wanted if p not in available]
        if unknown:
            log.warning("split %s: execution provider(s) %s not available in onnxruntime "
                        "%s (it has %s); running without them", manifest.split_id, unknown,
                        ort.__version__, available)
            wanted = [p for p in wanted if p not in unknown] or ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in wanted:
            _preload_cuda()
        options = session_options(threads, spinning=spinning)  # a bad value: BadInputError
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ManifestError(f"{path}: onnxruntime cannot load the tail: {exc}",
                                split_id=manifest.split_id) from exc
        missing = [p for p in wanted if p not in session.get_providers()]
        if missing:  # onnxruntime falls back quietly (no GPU, CUDA libraries missing)
            log.warning("split %s: execution provider(s) %s failed to start, running on %s",
                        manifest.split_id, missing, session.get_providers())
        if threads == 0 and session.get_providers() == ["CPUExecutionProvider"]:
            session = _fewest_threads(session, path, manifest, spinning, wanted)
        return cls(manifest, directory, session)

    def _check_session(self) -> int | None:
        """Check the session against the manifest; return its fixed batch size, if any."""
        sid = self.split_id
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != set(self.input_names):
            raise ManifestError(f"split {sid}: tail inputs {sorted(inputs)} differ from the "
                                f"manifest's cut {sorted(self.input_names)}", split_id=sid)
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [name for name in self.output_names if name not in outputs]
        if missing:
            raise ManifestError(f"split {sid}: tail lacks the manifest's outputs {missing}; "
                                f"it has {sorted(outputs)}", split_id=sid)
        fixed: set[int] = set()
        for spec in self.specs:
            node = inputs[spec.name]
            got = from_ort_type(node.type)
            if got != spec.dtype:
                raise ManifestError(f"split {sid}: tail input {spec.name!r} is {got}, the "
                                    f"manifest says {spec.dtype}", split_id=sid)
            shape = list(node.shape)
            if shape and isinstance(shape[0], int):
                fixed.add(shape[0])
        if len(fixed) > 1:
            raise ManifestError(f"split {sid}: tail inputs disagree on the batch size "
                                f"{sorted(fixed)}", split_id=sid)
        return fixed.pop() if fixed else None

    def prepare(self, env: Envelope) -> Prepared:
        """The request's tensors in input order; TensorError names expected vs got
        (:func:`splitinfer.tensors.check_tensors`, the edge agent's check too). A
        fixed-batch tail takes any sample count: it runs in chunks of its batch."""
        arrays = check_tensors(env.tensors, self.specs, "cut tensors", self.split_id,
                               any_batch=self.fixed_batch is not None, min_samples=1,
                               names_error=TensorError)
        feeds = tuple(arrays.values())
        key = tuple(tuple(int(d) for d in a.shape[1:]) for a in feeds)
        return Prepared(feeds=feeds, samples=int(feeds[0].shape[0]), key=key)

    def run(self, feeds: Sequence[Array]) -> list[Array]:
        """Run the tail once (blocking; onnxruntime releases the GIL while it computes)."""
        outputs = self.session.run(list(self.output_names),
                                   dict(zip(self.input_names, feeds, strict=True)))
        return [np.asarray(o) for o in outputs]


def _edge_only(directory: Path) -> bool:
    """An edge-only split (manifest kind "edge_only", no tail): nothing to serve; logged."""
    manifest = Manifest.load(directory)
    if getattr(manifest, "kind", "split") != "edge_only" and manifest.tail is not None:
        return False
    log.info("split %s in %s is edge-only (the device runs the whole model): not served",
             manifest.split_id, directory)
    return True


def split_directories(root: str | Path) -> list[Path]:
    """``root`` itself if it holds a manifest, else every directory below it that does.

    Symbolic links are followed (``artifacts/digits -> .versions/v7``, the atomic way to
    replace a directory), each real directory once; directories whose name starts with
    ``.`` are skipped (staging copies, Kubernetes' ``..data``), so a copy being written
    beside the live one is never served.
    """
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return [root]
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or two links to one directory
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if MANIFEST_NAME in filenames and Path(dirpath) != root:
            found.append(Path(dirpath))
    return sorted(found)


def open_directory(directory: Path, *, threads: int = 0, providers: Sequence[str] = (),
                   spinning: str = "off") -> Tail | None:
    """The tail of one split directory, None for an edge-only split (nothing to serve);
    a SplitInferError says what is wrong with it."""
    if _edge_only(directory):
        return None
    return Tail.open(directory, threads=threads, providers=providers, spinning=spinning)


class Registry(Mapping[str, Tail]):
    """Every tail a worker serves, by split id."""

    def __init__(self, tails: Sequence[Tail] = ()) -> None:
        self._tails: dict[str, Tail] = {}
        self.failed: dict[str, str] = {}  # directory -> why it was skipped
        self.edge_only: set[str] = set()  # directories of edge-only splits (not served)
        # split id -> tensor name -> image codec (cloud_only splits with an input_codec):
        # what splitinfer.wire.decode lets in encoded, decoding it before the full model.
        self.codecs: dict[str, dict[str, ImageCodec]] = {}
        for tail in tails:
            self.add(tail)

    def add(self, tail: Tail) -> None:
        if tail.split_id in self._tails:
            other = self._tails[tail.split_id].directory
            log.warning("split %s in %s is already served from %s; keeping the first",
                        tail.split_id, tail.directory, other)
            self.failed[str(tail.directory)] = (f"split {tail.split_id} is already served "
                                                f"from {other}")
            return
        self._put(tail)

    def _put(self, tail: Tail) -> None:
        self._tails[tail.split_id] = tail
        codecs = {s.name: c for s in tail.specs
                  if (c := tail.manifest.codec_for(s.name)) is not None}
        if codecs:
            self.codecs[tail.split_id] = codecs
        else:
            self.codecs.pop(tail.split_id, None)

    def swap(self, *, put: Sequence[Tail] = (), remove: Sequence[str] = ()) -> None:
        """Remove the split ids ``remove``, then serve ``put`` (replacing a tail of the
        same split id). Call on the event loop that submits requests: nothing runs in
        between, so a request sees the old set or the new one, never a mix."""
        for split_id in remove:
            self._tails.pop(split_id, None)
            self.codecs.pop(split_id, None)
        for tail in put:
            self._put(tail)

    def by_directory(self) -> dict[str, Tail]:
        """The tails served, by the directory (as a string) each was opened from."""
        return {str(tail.directory): tail for tail in self._tails.values()}

    @classmethod
    def load(cls, root: str | Path, *, threads: int = 0, providers: Sequence[str] = (),
             spinning: str = "off") -> Registry:
        """Open every split under ``root``; StartupError when none can be served."""
        if spinning not in SPINNING:  # not a fault of one split directory
            raise BadInputError(f"spinning {spinning!r}: expected one of {SPINNING}")
        root = Path(root)
        if not root.exists():
            raise StartupError(f"artifacts directory {root} does not exist; expected split "
                               "directories written by 'splitinfer split'")
        registry = cls()
        edge_only = 0
        for directory in split_directories(root):
            try:
                opened = open_directory(directory, threads=threads, providers=providers,
                                        spinning=spinning)
                if opened is None:
                    edge_only += 1
                    registry.edge_only.add(str(directory))
                    continue
                tail = opened
            except SplitInferError as exc:
                registry.failed[str(directory)] = str(exc)
                log.error("skipping split directory %s: %s", directory, exc)
                continue
            registry.add(tail)
            codec = tail.manifest.input_codec
            log.info("serving split %s (model %s, cut %s%s, %s) from %s", tail.split_id,
                     tail.manifest.model, ", ".join(tail.input_names),
                     f" as {codec['codec']} images" if codec else "",
                     "batched" if tail.batchable else f"fixed batch {tail.fixed_batch}",
                     directory)
        if not registry:
            if edge_only and not registry.failed:
                raise StartupError(f"nothing for a worker under {root}: its {edge_only} "
                                   "split(s) are edge-only (the whole model on the device, "
                                   "no tail); expected at least one split with a tail")
            why = "; ".join(f"{d}: {e}" for d, e in registry.failed.items())
            raise StartupError(f"no servable split under {root}" + (f" ({why})" if why else
                               "; expected directories with manifest.json and tail.onnx "
                               "written by 'splitinfer split'"))
        return registry

    def __getitem__(self, split_id: str) -> Tail:
        return self._tails[split_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tails)

    def __len__(self) -> int:
        return len(self._tails)
