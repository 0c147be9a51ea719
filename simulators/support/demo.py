"""``splitinfer demo``: the whole path on one machine, from a model to a report.

quantize (static int8 QDQ) → pick an int8 cut → split + verify → broker (mosquitto when
installed, else an embedded amqtt) → a cloud worker → a few edge agents → the test set
through the split path → accuracy split vs unsplit, bytes per request vs the raw input,
latency percentiles with the per-stage breakdown, and a report on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer import ort_config
from splitinfer.cli import env_default
from splitinfer.errors import BadInputError

__all__ = ["add_parser", "run", "choose_cut", "DemoOptions"]

log = logging.getLogger(__name__)
Array = np.ndarray[Any, Any]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="quantize, split and serve a model end to end on this machine",
        description="Quantize a model to int8, split it at an int8 cut, start a broker, a "
        "cloud worker and edge agents, push the test set through the split path and report "
        "accuracy (split vs unsplit), bytes per request and latency per stage.")
    p.add_argument("--model", help="ONNX model (default: the bundled digits CNN)")
    p.add_argument("--data", help="npz with one array per model input and an optional "
                   "'label' array (default: the bundled digits test set)")
    p.add_argument("--calibration", help="npz for int8 calibration (default: bundled, or "
                   "the first 200 samples of --data)")
    p.add_argument("--at", help="cut tensor name(s), comma separated (default: the int8 cut "
                   "with the fewest bytes)")
    p.add_argument("--devices", type=int, default=4, help="edge agents (default 4)")
    p.add_argument("--broker", default=env_default("--broker"),
                   help="use this broker URL instead of starting one")
    p.add_argument("--embedded-broker", action="store_true",
                   help="start the embedded amqtt broker even when mosquitto is installed")
    p.add_argument("--out", help="report directory (default: reports/demo-<time>)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


class DemoOptions(argparse.Namespace):
    model: str | None
    data: str | None
    calibration: str | None
    at: str | None
    devices: int
    broker: str | None
    embedded_broker: bool
    out: str | None
    json: bool


def choose_cut(cuts: Sequence[Any], min_share: float = 0.05) -> Any:
    """The int8 single-tensor cut with the fewest bytes that leaves real work on both sides.

    "Real work" = at least ``min_share`` of the FLOPs on each side, so the demo never
    ships a tail that is only a DequantizeLinear; without such a cut, any int8 cut with
    some work on both sides.
    """
    int8 = [c for c in cuts if c.quantized and len(c.tensors) == 1 and c.bytes_per_sample]
    usable = [c for c in int8 if min_share <= c.head_flops_share <= 1.0 - min_share] or \
        [c for c in int8 if 0.0 < c.head_flops_share < 1.0]
    if not usable:
        raise BadInputError("the quantized model offers no int8 cut with work on both sides; "
                            "name one with --at (see 'splitinfer inspect')")
    return min(usable, key=lambda c: (c.bytes_per_sample, c.index))


def _load_data(path: str | None) -> tuple[dict[str, Array], Array | None]:
    if path is None:
        from splitter.zoo import digits_test_set

        images, labels = digits_test_set()
        return {"image": images}, labels
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--data {path}: not a readable .npz file: {exc}") from exc
    labels = arrays.pop("label", None)
    return arrays, labels


def _predict(model: Path, inputs: Mapping[str, Array]) -> Array:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), ort_config.apply(ort.SessionOptions()),
                                providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, dict(inputs))[0])


def run(args: DemoOptions) -> int:
    started = time.perf_counter()
    # amqtt logs every health-check connection as an error; the demo is not about that.
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    from splitter import list_cuts, split_model
    from splitter.quantize import quantize_static
    from splitter.zoo import digits_calibration_path, digits_cnn_path

    if args.devices < 1:
        raise BadInputError(f"--devices {args.devices}: expected at least 1")
    out = Path(args.out or f"reports/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else digits_cnn_path()
    inputs, labels = _load_data(args.data)
    calibration: Any = args.calibration or (
        digits_calibration_path() if args.model is None
        else {k: v[:200] for k, v in inputs.items()})

    _say(args, f"model      {model.name}  ({len(next(iter(inputs.values())))} test samples)")
    int8 = quantize_static(model, calibration, out / f"{model.stem}.int8.onnx")
    cuts = list_cuts(int8)
    names = [n for n in args.at.split(",") if n] if args.at else \
        [t.name for t in choose_cut(cuts).tensors]
    split = split_model(int8, names, out / "split",
                        samples={k: v[:16] for k, v in inputs.items()})
    manifest = split.manifest_obj
    _say(args, f"quantized  {int8.name}; {len(cuts)} valid cuts; split at {names} "
               f"(verified: max |diff| {split.max_abs_diff})")

    ref_fp32 = _predict(model, inputs).argmax(axis=-1)
    ref_int8 = _predict(int8, inputs).argmax(axis=-1)
    outputs, timings, protocol, broker_kind = _serve_and_infer(args, split.manifest.parent,
                                                               inputs)
    split_pred = outputs.argmax(axis=-1)

    from edge_agent.stats import summarize
    from splitinfer.wire import REQUEST, Envelope, WireTensor, encode

    cut_arrays = [WireTensor(s.name, np.zeros((1, *[d if isinstance(d, int) else 1
                                                    for d in s.sample_shape]), s.dtype),
                             s.quantization) for s in manifest.cut]
    request_bytes = len(encode(Envelope(
        kind=REQUEST, request_id="0" * 32, device_id=f"demo-{args.devices - 1:02d}",
        split_id=manifest.split_id, tensors=cut_arrays, deadline=time.time(),
        reply_to=f"splitinfer/v1/res/demo-{args.devices - 1:02d}",
        timestamps={"created": 0.0, "sent": 0.0})))
    raw_bytes = sum(int(v[0].nbytes) for v in inputs.values())
    n = len(split_pred)

    def accuracy(pred: Array) -> float | None:
        return None if labels is None else round(float((pred == labels).mean()), 4)

    report = {
        "model": str(model),
        "samples": n,
        "split_id": manifest.split_id,
        "cut": [s.to_dict() for s in manifest.cut],
        "broker": broker_kind,
        "mqtt_protocol": protocol,
        "devices": args.devices,
        "accuracy": {"fp32_unsplit": accuracy(ref_fp32), "int8_unsplit": accuracy(ref_int8),
                     "int8_split": accuracy(split_pred)},
        "split_matches_unsplit_int8": int((split_pred == ref_int8).sum()),
        "bytes": {"cut_per_sample": manifest.bytes_per_sample,
                  "request_payload": request_bytes, "raw_input_per_sample": raw_bytes},
        "latency_ms": summarize(timings),
        "wall_s": round(time.perf_counter() - started, 2),
        "artifacts": str(split.manifest.parent),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["report"] = str(out / "report.json")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _say(args: DemoOptions, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def _serve_and_infer(args: DemoOptions, split_dir: Path, inputs: Mapping[str, Array],
                     ) -> tuple[Array, list[dict[str, float]], str, str]:
    from cloud_service import Config, Server
    from simulators.support.broker import EmbeddedBroker, start_broker

    broker: Any = None
    url = args.broker
    kind = "external"
    if url is None:
        broker = start_broker(prefer="embedded" if args.embedded_broker else "mosquitto")
        kind = "embedded amqtt (MQTT 3.1.1)" if isinstance(broker, EmbeddedBroker) \
            else "mosquitto (latency-tuned)"
        # amqtt speaks 3.1.1 only; asking for it directly skips a refused MQTT 5 CONNECT.
        url = broker.url + ("?protocol=3.1.1" if isinstance(broker, EmbeddedBroker) else "")
    shared = not isinstance(broker, EmbeddedBroker)
    # On amqtt no retained heartbeat (its retained-message delivery to a connecting client
    # races with other clients' SUBSCRIBEs: docs/brokers.md); one worker has no peer to
    # fence anyway.
    server = Server(Config(artifacts=split_dir, broker=url,
                           group="splitinfer-demo" if shared else "",
                           heartbeat_s=1.0 if shared else 0.0,
                           fence_after_s=3.0 if shared else 0.0))
    try:
        server.start_in_thread()
        _say(args, f"serving    broker {kind} at {url.split('?')[0]}; 1 worker; "
                   f"{args.devices} edge agents")
        outputs, timings, protocol = asyncio.run(_drive(args, split_dir, url, inputs))
        return outputs, timings, protocol, kind
    finally:
        server.should_exit = True
        if broker is not None:
            time.sleep(0.2)  # let the worker's drain reach the broker before it goes
            broker.stop()


async def _drive(args: DemoOptions, split_dir: Path, url: str, inputs: Mapping[str, Array],
                 ) -> tuple[Array, list[dict[str, float]], str]:
    from edge_agent import AgentConfig, EdgeAgent

    n = len(next(iter(inputs.values())))
    agents = [EdgeAgent.from_artifacts(split_dir, config=AgentConfig(
        device_id=f"demo-{i:02d}", broker=url, timeout_s=30.0)) for i in range(args.devices)]
    results: list[Any] = [None] * n
    try:
        await asyncio.gather(*(a.start() for a in agents))

        async def device(k: int) -> None:
            for i in range(k, n, len(agents)):
                sample = {name: v[i:i + 1] for name, v in inputs.items()}
                results[i] = await agents[k].infer(sample)

        await asyncio.gather(*(device(k) for k in range(len(agents))))
        protocol = agents[0].protocol
    finally:
        await asyncio.gather(*(a.close() for a in agents), return_exceptions=True)
    first_output = next(iter(results[0].outputs))
    outputs = np.concatenate([r.outputs[first_output] for r in results])
    return outputs, [dict(r.timings) for r in results], protocol


def _print_report(r: Mapping[str, Any]) -> None:
    acc = r["accuracy"]
    b = r["bytes"]

    def pct(v: float | None) -> str:
        return "n/a (no labels)" if v is None else f"{100 * v:.2f}%"

    print()
    print(f"accuracy   split int8 {pct(acc['int8_split'])}   unsplit int8 "
          f"{pct(acc['int8_unsplit'])}   unsplit fp32 {pct(acc['fp32_unsplit'])}")
    print(f"           {r['split_matches_unsplit_int8']}/{r['samples']} split predictions "
          "equal the unsplit int8 model's")
    print(f"bytes      {b['cut_per_sample']} B at the cut per sample "
          f"({b['request_payload']} B request payload) vs {b['raw_input_per_sample']} B raw "
          "input")
    print(f"latency    over {r['mqtt_protocol'] and 'MQTT ' + r['mqtt_protocol']}, "
          f"{r['samples']} requests (ms):")
    print(f"           {'stage':<9}{'p50':>9}{'p95':>9}{'p99':>9}")
    for stage, q in r["latency_ms"].items():
        if q.get("n"):
            print(f"           {stage:<9}{q['p50']:>9.3f}{q['p95']:>9.3f}{q['p99']:>9.3f}")
    print(f"report     {r['report']}  (artifacts in {r['artifacts']}; {r['wall_s']} s)")
