"""Head backends: run the head on the device, behind one small interface.

:class:`HeadRuntime` is what the agent calls; :class:`OrtHead` runs an ONNX head with
onnxruntime, :class:`TfliteHead` a ``head.tflite`` (``splitinfer split --head-format
tflite``) with LiteRT (ai-edge-litert, the ``edge-tflite`` extra: no onnxruntime on the
device). Each runtime is imported when a head is loaded, so ``import edge_agent`` stays
light and imports neither. :func:`load_head` reads a split directory, picks the backend
(:data:`BACKENDS`: ``auto`` takes onnxruntime where it is installed, else LiteRT where the
split has a TFLite head; ``SPLITINFER_HEAD_BACKEND`` sets the default) and checks the file
against the manifest (sha256, input and output names).
The baselines: a ``cloud_only`` split has no head file, and :func:`load_head` gives a
:class:`PassThroughHead` (the model inputs *are* the cut); an ``edge_only`` split's head
is the whole model (its "cut" lists the model outputs).

Never imports ``onnx``: a Raspberry Pi install has onnxruntime or LiteRT only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from splitinfer import ort_config
from splitinfer.errors import BadInputError, ManifestError, StartupError, TensorError
from splitinfer.manifest import Manifest, TfliteRef, sha256_file

__all__ = ["HeadRuntime", "OrtHead", "TfliteHead", "PassThroughHead", "load_head",
           "fewest_threads",
           "fixed_batch", "choose_backend", "SPINNING", "BACKENDS"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]

# onnxruntime pool threads: spin while a run lasts ("run"), also after it ("always",
# onnxruntime's default), or never ("off"): splitinfer.ort_config.SPINNING.
SPINNING = ort_config.SPINNING
# head backends: "onnx" (onnxruntime, head.onnx), "tflite" (LiteRT, head.tflite), "auto"
BACKENDS = ("auto", "onnx", "tflite")
BACKEND_ENV = "SPLITINFER_HEAD_BACKEND"


class HeadRuntime(Protocol):
    """Runs the device half of a split: model inputs in, cut tensors out."""

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def output_names(self) -> tuple[str, ...]: ...

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Blocking; safe to call from several threads at once."""
        ...


class OrtHead:
    """An ONNX head on onnxruntime (CPU unless ``providers`` says otherwise).

    ``threads`` caps onnxruntime's intra-op pool (default: one per usable CPU, set
    explicitly so that the threads are not pinned — see
    :func:`splitinfer.ort_config.pool_threads`; a Pi 4 has four, an agent sharing the
    board with other work may want fewer). One session
    may serve many agents.

    ``spinning`` (see :data:`SPINNING`): by default ("run") the pool threads spin while a
    run lasts and sleep as soon as it returns: no CPU is burned between frames, and the
    ops of one run do not each wake a sleeping thread ("off": the MobileNetV2 head of
    ``splitinfer bench overhead`` ran 0.8-1.4 ms over its best on a 2-vCPU VM, "run"
    0.1-0.5 ms). onnxruntime's own default ("always") keeps them spinning tens of ms
    after every run: a whole core, on a 2-core board, taken from the agent's loop that
    encodes and sends the cut and from everything else the device does.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, spinning: str = "run") -> None:
        import onnxruntime as ort

        if spinning not in SPINNING:
            raise BadInputError(f"spinning {spinning!r}: expected one of {SPINNING}")
        self.path = Path(path)
        self.spinning = spinning
        self.providers = tuple(providers) if providers else ("CPUExecutionProvider",)
        options = ort_config.apply(ort.SessionOptions())  # the same arithmetic as the worker
        options.intra_op_num_threads = ort_config.pool_threads(threads)  # never pinned
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "0" if spinning == "off" else "1")
        if spinning == "run":
            options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=list(self.providers))
        except Exception as exc:  # onnxruntime raises its own, unrelated types
            raise ManifestError(f"{self.path}: onnxruntime cannot load the head model: "
                                f"{exc}") from exc
        self._inputs = tuple(str(i.name) for i in self._session.get_inputs())
        self._outputs = tuple(str(o.name) for o in self._session.get_outputs())

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        try:
            results = self._session.run(list(self._outputs), dict(inputs))
        except Exception as exc:  # onnxruntime's InvalidArgument, Fail, …
            got = {k: f"{v.dtype.name}{tuple(v.shape)}" for k, v in inputs.items()}
            raise TensorError(f"head {self.path.name} rejected the inputs {got}: {exc}") from exc
        return {name: np.asarray(value) for name, value in zip(self._outputs, results,
                                                                 strict=True)}


class TfliteHead:
    """A TFLite head (``head.tflite``) on LiteRT's interpreter (``ai_edge_litert``).

    The file's signature takes the manifest's inputs and gives its cut under the keys
    ``ref`` maps them to (the manifest's ``head_tflite``); the converter already put the
    cut in the layout, dtype and quantization the tail expects, so nothing is transposed
    or cast here. ``threads``: LiteRT's CPU threads (XNNPACK; default one per core). A
    LiteRT interpreter is not thread-safe, so calls are serialised; a batch size other than
    the last call's makes LiteRT resize the input and re-plan (once per size change).
    """

    def __init__(self, path: str | Path, ref: TfliteRef, *, threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise StartupError(f"{path}: a TFLite head needs LiteRT: pip install "
                               f"'splitinfer[edge-tflite]' ({exc})") from exc
        self.path = Path(path)
        self.threads = threads or os.cpu_count() or 1
        try:
            self._interpreter = Interpreter(model_path=str(self.path),
                                            num_threads=self.threads)
            self._runner = self._interpreter.get_signature_runner(ref.signature)
        except (ValueError, RuntimeError) as exc:
            raise ManifestError(f"{self.path}: LiteRT cannot load the head (signature "
                                f"{ref.signature!r}): {exc}") from exc
        have_in = set(self._runner.get_input_details())
        have_out = set(self._runner.get_output_details())
        if set(ref.inputs.values()) != have_in or set(ref.outputs.values()) != have_out:
            raise ManifestError(f"{self.path}: its signature takes {sorted(have_in)} and "
                                f"gives {sorted(have_out)}; the manifest's head_tflite maps "
                                f"{dict(ref.inputs)} and {dict(ref.outputs)}")
        self._keys = dict(ref.inputs)
        self._names = {key: name for name, key in ref.outputs.items()}
        self._inputs = tuple(ref.inputs)
        self._outputs = tuple(ref.outputs)
        self._lock = threading.Lock()

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        feeds = {self._keys[name]: value for name, value in inputs.items()
                 if name in self._keys}
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise TensorError(f"head {self.path.name} needs inputs {list(self._inputs)}, "
                              f"got {sorted(inputs)} (missing {missing})")
        try:
            with self._lock:
                results = self._runner(**feeds)
                # the runner's arrays are views of the interpreter's buffers: copy before
                # the next call overwrites them
                return {self._names[key]: np.array(value) for key, value in results.items()}
        except (ValueError, RuntimeError) as exc:  # LiteRT's dtype/shape complaints
            got = {k: f"{v.dtype.name}{tuple(v.shape)}" for k, v in inputs.items()}
            raise TensorError(f"head {self.path.name} rejected the inputs {got}: {exc}") from exc


class PassThroughHead:
    """The head of a ``cloud_only`` split: runs nothing, the model inputs go out as the cut."""

    def __init__(self, manifest: Manifest) -> None:
        self._names = tuple(s.name for s in manifest.cut)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._names

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        return {name: inputs[name] for name in self._names}


def fixed_batch(manifest: Manifest) -> int | None:
    """The batch size a split's files are fixed at (their first dimension), None if dynamic.

    The head's inputs decide; a dynamic-batch head whose cut is fixed (a tail exported at
    batch 1) is bound by the cut.
    """
    for specs in (manifest.inputs, manifest.cut):
        for spec in specs:
            if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
                return spec.shape[0]
    return None


def _installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (onnxruntime takes ~0.2 s)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, a broken install
        return False


def choose_backend(manifest: Manifest, backend: str | None = None) -> str:
    """``onnx`` or ``tflite`` for this split: ``backend`` (default ``$SPLITINFER_HEAD_BACKEND``
    or ``auto``) where it names one; ``auto``: onnxruntime where it is installed, else
    LiteRT where the split has a TFLite head and LiteRT is installed."""
    wanted = backend or os.environ.get(BACKEND_ENV) or "auto"
    where = f"split {manifest.split_id}"
    if wanted not in BACKENDS:
        raise BadInputError(f"head backend {wanted!r}: expected one of {', '.join(BACKENDS)}"
                            + ("" if backend else f" (from ${BACKEND_ENV})"),
                            split_id=manifest.split_id)
    if wanted == "tflite" and manifest.head_tflite is None:
        raise ManifestError(f"{where} has no TFLite head (no head_tflite in its manifest); "
                            "convert one with 'splitinfer split ... --head-format tflite' or "
                            "run the ONNX head", split_id=manifest.split_id)
    if wanted != "auto":
        return wanted
    if _installed("onnxruntime"):
        return "onnx"
    if manifest.head_tflite is not None and _installed("ai_edge_litert"):
        return "tflite"
    hint = ("pip install 'splitinfer[edge-tflite]' (its head.tflite runs on LiteRT) or "
            "'splitinfer[edge]'" if manifest.head_tflite is not None else
            "pip install 'splitinfer[edge]' (this split has no head.tflite for "
            "splitinfer[edge-tflite])")
    raise StartupError(f"{where}: no runtime for its head is installed: {hint}",
                       split_id=manifest.split_id)


def load_head(manifest: Manifest, directory: str | Path, *, threads: int | None = None,
              verify: bool = True, backend: str | None = None) -> HeadRuntime:
    """The head of the split in ``directory``, checked against its manifest.

    ``verify`` compares the file's sha256 with the manifest's (a stale or partly copied
    head otherwise fails much later, as a wrong answer from the tail). A ``cloud_only``
    split (no head file) gets a :class:`PassThroughHead`. ``backend``: see
    :func:`choose_backend`.
    """
    if manifest.head is None:
        if manifest.kind != "cloud_only":
            raise ManifestError(f"manifest of {manifest.split_id} names no head file but is "
                                f"of kind {manifest.kind!r}; only a cloud_only split has none",
                                split_id=manifest.split_id)
        return PassThroughHead(manifest)
    chosen = choose_backend(manifest, backend)
    which = "head_tflite" if chosen == "tflite" else "head"
    ref = manifest.head_tflite if chosen == "tflite" else manifest.head
    path = manifest.resolve(directory, which)
    if not path.is_file():
        raise ManifestError(f"{path}: head file named by the manifest of {manifest.split_id} "
                            "is missing; copy the whole split directory to the device",
                            split_id=manifest.split_id)
    if verify and ref is not None:
        actual = sha256_file(path)
        if actual != ref.sha256:
            raise ManifestError(f"{path}: sha256 {actual[:12]}… does not match the manifest's "
                                f"{ref.sha256[:12]}…; the head and manifest.json come "
                                "from different splits", split_id=manifest.split_id)
    head: HeadRuntime
    if manifest.head_tflite is not None and chosen == "tflite":
        head = TfliteHead(path, manifest.head_tflite, threads=threads)
    elif path.suffix == ".tflite":
        raise ManifestError(f"{path}: a .tflite file as the manifest's ONNX head; a TFLite "
                            "head goes in head_tflite ('splitinfer split --head-format "
                            "tflite')", split_id=manifest.split_id)
    else:
        head = OrtHead(path, threads=threads)
        if not threads:
            head = fewest_threads(head, manifest)
    check_head(head, manifest)
    return head


def fewest_threads(head: OrtHead, manifest: Manifest) -> OrtHead:
    """``head`` (a pool of all usable CPUs) or a one-thread head of the same file,
    whichever runs one sample faster by :data:`splitinfer.ort_config.POOL_GAIN`; measured
    here and now on zeros of the inputs' shapes, as the worker does for its tails. Inputs
    with unknown dimensions, or a head that cannot run on zeros, keep the pool."""
    if ort_config.usable_cpus() < 2 or head.providers != ("CPUExecutionProvider",):
        return head
    feeds: dict[str, Array] = {}
    for spec in manifest.inputs:
        dims = spec.shape[1:]
        sizes = [d for d in dims if isinstance(d, int)]
        if len(sizes) != len(dims):
            return head
        feeds[spec.name] = np.zeros((1, *sizes), dtype=spec.dtype)
    try:
        single = OrtHead(head.path, threads=1, spinning=head.spinning)
        pool_s, single_s = ort_config.calibration_times(
            lambda: head.run(feeds), lambda: single.run(feeds))
    except Exception as exc:  # a head that cannot run on zeros still serves as before
        log.debug("split %s: head thread calibration skipped: %r", manifest.split_id, exc)
        return head
    chosen = single if single_s <= pool_s * ort_config.POOL_GAIN else head
    log.info("split %s: head on %s (one sample: 1 thread %.3f ms, %d threads %.3f ms)",
             manifest.split_id, "1 thread" if chosen is single else
             f"{ort_config.pool_threads(0)} threads", single_s * 1e3,
             ort_config.pool_threads(0), pool_s * 1e3)
    return chosen


def check_head(head: HeadRuntime, manifest: Manifest) -> None:
    """Raise ManifestError unless the head's names agree with the manifest."""
    want_in = [s.name for s in manifest.inputs]
    missing = [n for n in head.input_names if n not in want_in]
    if missing:
        raise ManifestError(f"head of {manifest.split_id} needs inputs {list(head.input_names)}"
                            f", the manifest lists {want_in}", split_id=manifest.split_id)
    want_out = [s.name for s in manifest.cut]
    absent = [n for n in want_out if n not in head.output_names]
    if absent:
        raise ManifestError(f"head of {manifest.split_id} produces {list(head.output_names)}, "
                            f"the manifest's cut is {want_out}", split_id=manifest.split_id)
