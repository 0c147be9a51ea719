"""What every cut of a model sends on the wire, measured: raw and compressed bytes per cut.

``splitinfer inspect --json`` lists the cuts from the graph alone; this module runs the
model once per sample (onnxruntime, graph optimizations off so that every crossing tensor,
int8 QDQ ones included, holds exactly the values the split's head produces) with every
tensor that crosses a listed cut exposed as an output, and measures each codec of
:mod:`splitinfer.compression` on the bytes a device would send for that cut: one request
per sample (or per fixed batch), tensors below ``MIN_BYTES`` or that a codec does not
shrink by 5 % counted raw, as the encoder sends them.

The samples are the caller's (an ``.npz``) or generated (:func:`splitter.verify.make_samples`:
uniform noise for images, so their activations compress worse than real ones do).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from splitinfer.batches import padded_chunks
from splitinfer.compression import report, supported
from splitter.cuts import Cut
from splitter.graph import GraphIndex
from splitter.verify import make_samples, ort_session

__all__ = ["DEFAULT_SAMPLES", "measure_cuts"]

log = logging.getLogger(__name__)
DEFAULT_SAMPLES = 8  # requests measured: enough for a median, cheap for a big model

Array = np.ndarray[Any, Any]


def measure_cuts(index: GraphIndex, cuts: Sequence[Cut],
                 samples: Mapping[str, Array] | None = None, *,
                 num_samples: int = DEFAULT_SAMPLES, seed: int = 0,
                 codecs: Sequence[str] | None = None
                 ) -> tuple[list[dict[str, Any] | None], dict[str, Any]]:
    """Per cut (in ``cuts`` order): :func:`splitinfer.compression.report` of what it sends
    (None for edge_only, which sends nothing), and a summary of the measurement
    (``samples``, ``source``, ``codecs``, or ``skipped`` with the reason: no codec, symbolic
    input dims without samples, a model onnxruntime cannot run). At most
    ``num_samples`` requests are measured, from ``samples`` or generated."""
    names = list(codecs) if codecs is not None else list(supported())
    summary: dict[str, Any] = {"codecs": names, "samples": 0,
                               "source": "file" if samples is not None else "generated"}
    none: list[dict[str, Any] | None] = [None] * len(cuts)
    if not names:
        return none, {**summary, "skipped": "no compression codec installed (pip install "
                      "zstandard)"}
    if samples is None and index.unknown_dims():
        return none, {**summary, "skipped": "symbolic input dims: give --input-shape or "
                      "--samples to measure the compressed bytes"}
    data = dict(samples) if samples is not None else make_samples(
        index.analysis_model, num_samples, seed)
    wanted = list(dict.fromkeys(n for c in cuts if c.kind != "edge_only" for n in c.names))
    inputs = list(index.inputs)
    fixed = next((d[0] for d in (index.spec(n).shape for n in inputs)
                  if d and isinstance(d[0], int) and d[0] > 0), 1)
    feeds = padded_chunks({n: data[n] for n in inputs}, fixed)[:max(num_samples, 1)]
    probe = onnx.ModelProto()
    probe.CopyFrom(index.analysis_model)
    declared = {v.name for v in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted
                              if n not in declared and n not in inputs)
    produced = [n for n in wanted if n not in inputs]
    per_feed: list[dict[str, bytes]] = []
    try:  # best effort: inspect lists the cuts of models onnxruntime cannot run, too
        session = ort_session(probe, base_dir=index.base_dir, optimize=False,
                              what="the model (to measure the bytes of its cuts)")
        for feed in feeds:
            values = dict(zip(produced, session.run(produced, feed), strict=True)) \
                if produced else {}
            values.update({n: feed[n] for n in wanted if n in inputs})
            per_feed.append({n: np.ascontiguousarray(values[n]).tobytes() for n in wanted})
    except Exception as exc:  # onnxruntime's errors share no useful base class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("could not run the model to measure its cuts' bytes: %s", first)
        return none, {**summary, "skipped": f"onnxruntime could not run the model: {first}"}
    out: list[dict[str, Any] | None] = []
    for cut in cuts:
        if cut.kind == "edge_only":
            out.append(None)
            continue
        out.append(report([[f[n] for n in cut.names] for f in per_feed], names))
    log.debug("measured the wire bytes of %d cut(s) on %d request(s)", len(cuts),
              len(per_feed))
    return out, {**summary, "samples": len(per_feed)}
