"""Head backends: run ``head.onnx`` on the device, behind one small interface.

:class:`HeadRuntime` is what the agent calls; :class:`OrtHead` runs an ONNX head with
onnxruntime (imported when a head is loaded, so ``import edge_agent`` stays light).
:func:`load_head` reads a split directory, checks the head file against the manifest
(sha256, input and output names) and picks the backend by file suffix. A TFLite backend
(ai-edge-litert) would slot in here for ``.tflite`` heads; it is not written yet.
The baselines: a ``cloud_only`` split has no head file, and :func:`load_head` gives a
:class:`PassThroughHead` (the model inputs *are* the cut); an ``edge_only`` split's head
is the whole model (its "cut" lists the model outputs).

Never imports ``onnx``: a Raspberry Pi install has onnxruntime only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from splitinfer import ort_config
from splitinfer.errors import BadInputError, ManifestError, StartupError, TensorError
from splitinfer.manifest import Manifest, sha256_file

__all__ = ["HeadRuntime", "OrtHead", "PassThroughHead", "load_head", "fixed_batch",
           "SPINNING"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]

# onnxruntime pool threads: spin while a run lasts ("run"), also after it ("always",
# onnxruntime's default), or never ("off").
SPINNING = ("run", "always", "off")


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

    ``threads`` caps onnxruntime's intra-op pool (default: onnxruntime's, one per core; a
    Pi 4 has four, an agent sharing the board with other work may want fewer). One session
    may serve many agents.

    ``spinning`` (see :data:`SPINNING`): by default the pool threads sleep when out of
    work. onnxruntime's own default ("always") keeps them spinning ~50 ms after every
    run: a whole core, on a 2-core board, taken from the agent's loop that encodes and
    sends the cut and from everything else the device does; "run" spins while a run lasts
    only, which is fastest back to back but slowest after an idle gap — a device running
    its head once per frame or per event sees mostly gaps (measured in
    ``cloud_service.registry.session_options`` and by ``splitinfer bench overhead``).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, spinning: str = "off") -> None:
        import onnxruntime as ort

        if spinning not in SPINNING:
            raise BadInputError(f"spinning {spinning!r}: expected one of {SPINNING}")
        self.path = Path(path)
        options = ort_config.apply(ort.SessionOptions())  # the same arithmetic as the worker
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "0" if spinning == "off" else "1")
        if spinning == "run":
            options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=options,
                providers=list(providers) if providers else ["CPUExecutionProvider"])
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


def load_head(manifest: Manifest, directory: str | Path, *, threads: int | None = None,
              verify: bool = True) -> HeadRuntime:
    """The head of the split in ``directory``, checked against its manifest.

    ``verify`` compares the file's sha256 with the manifest's (a stale or partly copied
    head otherwise fails much later, as a wrong answer from the tail). A ``cloud_only``
    split (no head file) gets a :class:`PassThroughHead`.
    """
    if manifest.head is None:
        if manifest.kind != "cloud_only":
            raise ManifestError(f"manifest of {manifest.split_id} names no head file but is "
                                f"of kind {manifest.kind!r}; only a cloud_only split has none",
                                split_id=manifest.split_id)
        return PassThroughHead(manifest)
    path = manifest.resolve(directory, "head")
    if not path.is_file():
        raise ManifestError(f"{path}: head file named by the manifest of {manifest.split_id} "
                            "is missing; copy the whole split directory to the device",
                            split_id=manifest.split_id)
    if verify:
        actual = sha256_file(path)
        if actual != manifest.head.sha256:
            raise ManifestError(f"{path}: sha256 {actual[:12]}… does not match the manifest's "
                                f"{manifest.head.sha256[:12]}…; the head and manifest.json come "
                                "from different splits", split_id=manifest.split_id)
    if path.suffix == ".tflite":
        raise StartupError(f"{path}: TFLite heads are not supported yet; export the head as "
                           "ONNX", split_id=manifest.split_id)
    head = OrtHead(path, threads=threads)
    check_head(head, manifest)
    return head


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
