"""docs/wire.md is enough to write a client: its example, sent by the mosquitto clients.

The client half of this file (the section marked below) reads docs/wire.md and builds,
sends and reads messages with ``msgpack``, ``numpy`` and the ``mosquitto_pub`` /
``mosquitto_sub`` binaries only, as a client in another language would; nothing of this
project is imported there. The project only provides the fixtures: a mosquitto, the
digits CNN split at ``relu3`` and a worker (``cloud_service.server.Server``) in a thread.

The example in docs/wire.md is checked both ways: its hex dumps decode to its readable
maps, and the worker answers its request with the unsplit model's logits. When the
example has to change (a new split id, a new field), regenerate it::

    python tests/test_wire_doc.py     # prints the example blocks for docs/wire.md
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire.md"
MODEL = "digits_cnn"  # the example's {model} level: topic_name(manifest["model"])
CUT = "relu3"
DEVICE = "cam-0007"
TEST_IMAGE = 0  # index into splitter/models/digits_test.npz
FP32_TOL = 1e-5

# ---- the client: docs/wire.md + msgpack + numpy + mosquitto_pub/sub, nothing of ours ----

_BLOCK = re.compile(r"<!-- wire-example: (?P<name>[\w.-]+) -->\s*```[^\n]*\n(?P<body>.*?)```",
                    re.DOTALL)
_BIN = re.compile(r"<bin (?P<size>\d+): (?P<dtype>\w+) little-endian \[(?P<values>[^\]]*)\]>")
_BIN_PLAIN = re.compile(r"<bin (?P<size>\d+): (?P<hex>[0-9a-f]*)>")


def doc_blocks(path: Path = DOC) -> dict[str, str]:
    """The fenced blocks of the page marked ``<!-- wire-example: NAME -->``, by name."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(path.read_text(encoding="utf-8"))}


def parse_xxd(text: str) -> bytes:
    """Bytes of an ``xxd`` dump (``00000000: 89a1 7601 …  ..v.``); ``xxd -r`` reads it too."""
    out = bytearray()
    for line in text.splitlines():
        if not line.strip():
            continue
        offset, rest = line.split(": ", 1)
        if int(offset, 16) != len(out):
            raise ValueError(f"xxd line at offset {offset}, expected {len(out):08x}")
        out += bytes.fromhex(rest[:39].replace(" ", ""))
    return bytes(out)


def format_xxd(data: bytes) -> str:
    lines = []
    for start in range(0, len(data), 16):
        chunk = data[start:start + 16]
        groups = " ".join(chunk[i:i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 0x20 <= b < 0x7f else "." for b in chunk)
        lines.append(f"{start:08x}: {groups:<39}  {text}")
    return "\n".join(lines) + "\n"


def parse_readable(text: str) -> Any:
    """The page's readable map: JSON, where ``<bin N: float32 little-endian [..]>`` and
    ``<bin N: HEX>`` stand for msgpack bin values."""
    bins: list[bytes] = []

    def typed(m: re.Match[str]) -> str:
        values = json.loads(f"[{m['values']}]")
        bins.append(np.asarray(values, dtype=np.dtype(m["dtype"]).newbyteorder("<")).tobytes())
        if len(bins[-1]) != int(m["size"]):
            raise ValueError(f"{m[0][:40]}…: {len(bins[-1])} bytes, the page says {m['size']}")
        return f'"\\u0000bin{len(bins) - 1}"'

    def plain(m: re.Match[str]) -> str:
        bins.append(bytes.fromhex(m["hex"]))
        return f'"\\u0000bin{len(bins) - 1}"'

    body = json.loads(_BIN_PLAIN.sub(plain, _BIN.sub(typed, text)))

    def restore(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("\0bin"):
            return bins[int(value[4:])]
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(body)


def format_readable(body: Any, indent: str = "") -> str:
    """The inverse of :func:`parse_readable`, one key per line (float32 bins as values)."""
    if isinstance(body, dict):
        inner = indent + " "
        items = [f"{json.dumps(k)}: {format_readable(v, inner + ' ' * (len(k) + 4))}"
                 for k, v in body.items()]
        return "{" + f",\n{inner}".join(items) + "}"
    if isinstance(body, list):
        if all(isinstance(v, (int, float)) for v in body):
            return json.dumps(body)
        inner = indent + " "
        return "[" + f",\n{inner}".join(format_readable(v, inner) for v in body) + "]"
    if isinstance(body, bytes):
        return f"<bin {len(body)}: {body.hex()}>"
    return json.dumps(body)


def float32_bin(data: bytes) -> str:
    values = np.frombuffer(data, dtype="<f4")
    shown = [np.format_float_positional(v, unique=True, trim="0") for v in values]
    rows = ",\n    ".join(", ".join(shown[i:i + 8]) for i in range(0, len(shown), 8))
    return f"<bin {len(data)}: float32 little-endian [\n    {rows}]>"


def show_tensors(body: dict[str, Any]) -> str:
    """:func:`format_readable`, with float32 tensor bytes written as their values."""
    text = format_readable(body)
    for entry in body.get("t", []):
        if entry.get("d") == "float32":
            text = text.replace(f"<bin {len(entry['b'])}: {entry['b'].hex()}>",
                                float32_bin(entry["b"]))
    return text


def mqtt_request_topic(prefix: str, model: str, device: str) -> str:
    return f"{prefix}/v1/req/{model}/{device}"


def mqtt_result_topic(prefix: str, device: str) -> str:
    return f"{prefix}/v1/res/{device}"


def send_and_receive(host: str, port: int, prefix: str, payload: bytes, *, version: str,
                     device: str = DEVICE, model: str = MODEL,
                     correlation: str | None = None) -> tuple[bytes, str]:
    """Publish ``payload`` as a request with mosquitto_pub; the result's payload (and, on
    MQTT 5, its correlation data) as mosquitto_sub printed them."""
    common = ["-h", host, "-p", str(port), "-V", version, "-q", "1"]
    result_topic = mqtt_result_topic(prefix, device)
    # A persistent session subscribed first (-E: exit once subscribed), so the result waits
    # for the reading client below whatever the timing.
    session = ["-i", f"wiredoc-{uuid.uuid4().hex[:10]}", "-c", "-t", result_topic]
    subprocess.run(["mosquitto_sub", *common, *session, "-E"], check=True, timeout=10)
    pub = ["mosquitto_pub", *common, "-t", mqtt_request_topic(prefix, model, device), "-s"]
    if version == "mqttv5" and correlation is not None:
        pub += ["-D", "publish", "correlation-data", correlation,
                "-D", "publish", "response-topic", result_topic,
                "-D", "publish", "message-expiry-interval", "30"]
    subprocess.run(pub, input=payload, check=True, timeout=10)
    got = subprocess.run(["mosquitto_sub", *common, *session, "-C", "1", "-W", "10",
                          "-F", "%x|%D"], capture_output=True, check=True, timeout=15)
    hex_payload, _, corr = got.stdout.decode().rstrip("\n").partition("|")
    return bytes.fromhex(hex_payload), corr


def msgpack_types(value: Any) -> Any:
    """The shape of a decoded message: msgpack type names in place of values."""
    if isinstance(value, dict):
        return {k: msgpack_types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [msgpack_types(v) for v in value]
    return {bool: "bool", int: "int", float: "float", str: "str", bytes: "bin"}[type(value)]


# ---- fixtures and the reference (these may use the project) ----------------------------


def _digits_split(root: Path) -> Path:
    from splitter import split_model, zoo

    out = root / "digits_relu3"
    split_model(zoo.digits_cnn_path(), [CUT], out, num_samples=4)
    return out


def _image() -> np.ndarray[Any, Any]:
    from splitter import zoo

    images, _ = zoo.digits_test_set()
    return images[TEST_IMAGE:TEST_IMAGE + 1]


def _unsplit_logits() -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    from splitinfer import ort_config  # here, not at the top: the client half imports this file
    from splitter import zoo

    session = ort.InferenceSession(str(zoo.digits_cnn_path()),
                                   ort_config.apply(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"image": _image()})[0])


def _head_output(split_dir: Path) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    from splitinfer import ort_config

    session = ort.InferenceSession(str(split_dir / "head.onnx"),
                                   ort_config.apply(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    return np.asarray(session.run([CUT], {"image": _image()})[0])


def _worker(url: str, artifacts: Path, prefix: str) -> contextlib.AbstractContextManager[Any]:
    # Imported here: the isolated client half imports this module with ours unimportable.
    from test_cloud_support import running

    from cloud_service.config import Config
    from cloud_service.server import Server

    return running(Server(Config(artifacts=artifacts, broker=url, prefix=prefix, threads=1,
                                 metrics_interval_s=0)))


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _digits_split(tmp_path_factory.mktemp("wire-doc"))


@pytest.fixture(scope="module")
def mosquitto_clients() -> None:
    if not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")):
        pytest.fail("mosquitto_pub/mosquitto_sub missing: apt-get install -y mosquitto-clients")


@pytest.fixture(scope="module")
def blocks() -> dict[str, str]:
    found = doc_blocks()
    missing = {"request.hex", "request.map", "result.hex", "result.map",
               "error.map"} - set(found)
    assert not missing, f"docs/wire.md lacks the example blocks {sorted(missing)}"
    return found


# ---- the tests ---------------------------------------------------------------------------


def test_doc_hex_dumps_decode_to_the_doc_maps(blocks: dict[str, str]) -> None:
    for name in ("request", "result"):
        raw = parse_xxd(blocks[f"{name}.hex"])
        decoded = msgpack.unpackb(raw, raw=False)
        assert decoded == parse_readable(blocks[f"{name}.map"]), name
        # what the page calls the encoding is the encoding: bin for "b", no str bytes
        assert msgpack.packb(decoded, use_bin_type=True) == raw, name
    request = parse_readable(blocks["request.map"])
    assert request["split"].startswith(f"{MODEL}-")
    tensor = request["t"][0]
    assert isinstance(tensor["b"], bytes)
    assert len(tensor["b"]) == int(np.prod(tensor["s"])) * np.dtype(tensor["d"]).itemsize


_ISOLATED_CLIENT = """
import importlib.abc, sys

class NothingOfOurs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"splitinfer", "edge_agent", "cloud_service", "splitter",
                                  "simulators", "bench"}:
            raise ImportError(f"the client imported {name}")
        return None

sys.meta_path.insert(0, NothingOfOurs())
sys.path.insert(0, sys.argv[1])
import msgpack
import test_wire_doc as doc

blocks = doc.doc_blocks()
built = msgpack.packb(doc.parse_readable(blocks["request.map"]), use_bin_type=True)
assert built == doc.parse_xxd(blocks["request.hex"]), "the map and the dump differ"
print(len(built))
"""


def test_client_half_needs_nothing_of_this_project() -> None:
    """The request is built from the page with msgpack + numpy, the project unimportable."""
    got = subprocess.run([sys.executable, "-c", _ISOLATED_CLIENT, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert int(got.stdout) == len(parse_xxd(doc_blocks()["request.hex"]))


@pytest.mark.integration
def test_doc_example_is_the_real_head_output(blocks: dict[str, str], split_dir: Path) -> None:
    manifest = json.loads((split_dir / "manifest.json").read_text())
    request = parse_readable(blocks["request.map"])
    assert request["split"] == manifest["split_id"], "regenerate the example in docs/wire.md"
    tensor = request["t"][0]
    sent = np.frombuffer(tensor["b"], dtype="<f4").reshape(tensor["s"])
    np.testing.assert_allclose(sent, _head_output(split_dir), rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.integration
@pytest.mark.usefixtures("mosquitto_clients")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_doc_request_through_mosquitto_clients(mosquitto: Any, split_dir: Path,
                                               topic_prefix: str, blocks: dict[str, str],
                                               version: str) -> None:
    request = parse_xxd(blocks["request.hex"])
    corr = f"corr-{version}"
    with _worker(mosquitto.url, split_dir, topic_prefix):
        raw, got_corr = send_and_receive(mosquitto.host, mosquitto.port, topic_prefix,
                                         request, version=version, correlation=corr)
    result = msgpack.unpackb(raw, raw=False)
    documented = parse_readable(blocks["result.map"])
    assert "err" not in result, result.get("err")
    # the result has exactly the documented fields and types (values of ts differ per run)
    assert msgpack_types(result) == msgpack_types(documented)
    assert (result["v"], result["k"], result["id"], result["dev"], result["split"]) == \
        (1, "res", documented["id"], DEVICE, documented["split"])
    assert set(result["ts"]) == set(documented["ts"])
    assert result["ts"]["sent"] == parse_readable(blocks["request.map"])["ts"]["sent"]
    tensor = result["t"][0]
    assert (tensor["n"], tensor["d"], tensor["s"]) == ("logits", "float32", [1, 10])
    logits = np.frombuffer(tensor["b"], dtype="<f4").reshape(tensor["s"])
    np.testing.assert_allclose(logits, _unsplit_logits(), rtol=FP32_TOL, atol=FP32_TOL)
    doc_logits = np.frombuffer(documented["t"][0]["b"], dtype="<f4").reshape(1, 10)
    np.testing.assert_allclose(logits, doc_logits, rtol=FP32_TOL, atol=FP32_TOL)
    # MQTT 5: the correlation data comes back; 3.1.1 has none and needs none
    assert got_corr == (corr if version == "mqttv5" else "")


@pytest.mark.integration
@pytest.mark.usefixtures("mosquitto_clients")
def test_b_as_str_gets_the_documented_error(mosquitto: Any, split_dir: Path,
                                            topic_prefix: str, blocks: dict[str, str]) -> None:
    body = parse_readable(blocks["request.map"])
    body["id"] = "b-as-str"
    body["t"][0]["b"] = body["t"][0]["b"].hex()  # a str: the page says it must be bin
    payload = msgpack.packb(body, use_bin_type=True)
    with _worker(mosquitto.url, split_dir, topic_prefix):
        raw, _ = send_and_receive(mosquitto.host, mosquitto.port, topic_prefix, payload,
                                  version="mqttv311")
    result = msgpack.unpackb(raw, raw=False)
    documented = parse_readable(blocks["error.map"])
    assert msgpack_types(result) == msgpack_types(documented)
    assert result["err"]["code"] == documented["err"]["code"] == "bad_message"
    # the page shows the worker's very words: field, tensor, msgpack types
    assert result["err"]["msg"] == documented["err"]["msg"], result["err"]["msg"]
    assert (result["id"], result["dev"], result["t"]) == ("b-as-str", DEVICE, [])


# ---- regenerating the example -------------------------------------------------------------


def main() -> int:
    """Print the example blocks for docs/wire.md (needs mosquitto; about 5 s)."""
    from simulators.support.broker import MosquittoBroker

    with tempfile.TemporaryDirectory() as tmp:
        split = _digits_split(Path(tmp))
        manifest = json.loads((split / "manifest.json").read_text())
        activation = _head_output(split).astype("<f4")
        request = {
            "v": 1, "k": "req", "id": "5f0c7a9e6d3b4c21a8e4f1b2c3d4e5f6", "dev": DEVICE,
            "split": manifest["split_id"], "dl": 0.0, "ts": {"sent": 1764590400.0},
            "t": [{"n": CUT, "d": "float32", "s": list(activation.shape),
                   "b": activation.tobytes()}],
        }
        payload = msgpack.packb(request, use_bin_type=True)
        bad = dict(request, id="b-as-str",
                   t=[dict(request["t"][0], b=activation.tobytes().hex())])
        with MosquittoBroker() as broker, _worker(broker.url, split, "splitinfer"):
            raw, _ = send_and_receive(broker.host, broker.port, "splitinfer", payload,
                                      version="mqttv311")
            err, _ = send_and_receive(broker.host, broker.port, "splitinfer",
                                      msgpack.packb(bad, use_bin_type=True),
                                      version="mqttv311")
    result = msgpack.unpackb(raw, raw=False)
    for name, text in (("request.hex", format_xxd(payload)),
                       ("request.map", show_tensors(request)),
                       ("result.hex", format_xxd(raw)),
                       ("result.map", show_tensors(result)),
                       ("error.map", format_readable(msgpack.unpackb(err, raw=False)))):
        print(f"<!-- wire-example: {name} -->\n```text\n{text.rstrip()}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
