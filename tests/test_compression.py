"""Compressed tensors on the wire (``"z"``): bit-exact round trips, every hostile form
refused as ``bad_tensor`` before more than the declared bytes are allocated, the encoder's
"worth sending" rule, the manifest field, ``split_model(compression=)`` and its measured
choice, the profiles' compressed bytes and the cost model pricing them. End to end through
mosquitto: tests/test_compression_e2e.py; the CLI flags and ``inspect --json``:
tests/test_splitter_cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from splitinfer import compression, wire
from splitinfer.errors import WireError
from splitinfer.manifest import Quantization

CODECS = compression.supported()


def _activation(shape: tuple[int, ...] = (1, 16, 8, 8)) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    out: np.ndarray[Any, Any] = np.clip(np.maximum(x, 0) * 40, 0, 127).astype(np.int8)
    return out  # ReLU'd int8: many zeros


def _request(t: wire.WireTensor) -> wire.Envelope:
    return wire.Envelope(kind=wire.REQUEST, request_id="r1", device_id="d", split_id="s",
                         tensors=(t,))


def _raw_entry(array: np.ndarray[Any, Any], z: object, b: bytes, shape: list[int] | None = None
               ) -> bytes:
    body = {"v": 1, "k": "req", "id": "r1", "dev": "d", "split": "s", "dl": 0.0, "ts": {},
            "t": [{"n": "x", "d": str(array.dtype), "s": list(array.shape) if shape is None
                   else shape, "b": b, "z": z}]}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def test_both_codecs_are_installed() -> None:
    assert set(CODECS) == {"zstd", "lz4"}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.float32])
def test_round_trip_is_bit_exact(codec: str, dtype: type) -> None:
    array: np.ndarray[Any, Any] = _activation().astype(dtype)
    q = Quantization(scale=0.02, zero_point=0) if dtype is not np.float32 else None
    payload = wire.encode(_request(wire.WireTensor("x", array, q, compression=codec)))
    entry = msgpack.unpackb(payload)["t"][0]
    assert entry["z"] == codec and len(entry["b"]) < array.nbytes
    out = wire.decode(payload).tensors[0]
    assert out.compression == codec
    assert out.array.dtype == array.dtype and out.array.shape == array.shape
    assert out.array.tobytes() == array.tobytes()
    assert out.quantization == q


def test_manifest_policy_applies_to_tensors_naming_none() -> None:
    array = _activation()
    payload = wire.encode(_request(wire.WireTensor("x", array)), compression="zstd")
    assert msgpack.unpackb(payload)["t"][0]["z"] == "zstd"
    assert wire.decode(payload).tensors[0].array.tobytes() == array.tobytes()


def test_incompressible_tensor_is_sent_raw() -> None:
    noise = np.random.default_rng(1).integers(-128, 128, size=(1, 4096), dtype=np.int8)
    payload = wire.encode(_request(wire.WireTensor("x", noise, compression="zstd")))
    entry = msgpack.unpackb(payload)["t"][0]
    assert "z" not in entry and len(entry["b"]) == noise.nbytes
    assert wire.decode(payload).tensors[0].compression is None


@pytest.mark.parametrize("codec", CODECS)
def test_decompression_bomb_is_refused(codec: str) -> None:
    small = np.zeros((1, 16), dtype=np.int8)  # claims 16 bytes
    bomb = compression.compress(codec, bytes(8 * 1024 * 1024))  # holds 8 MiB of zeros
    assert len(bomb) < 64 * 1024
    # the shape says 16 bytes: the bomb must be smaller than that to get past the size
    # check, so build one that is: 16 bytes claimed, a frame holding 4 KiB
    tiny_bomb = compression.compress(codec, bytes(4096))
    for data, shape in ((bomb, [1, 16]), (tiny_bomb, [1, len(tiny_bomb) + 1])):
        with pytest.raises(WireError) as err:
            wire.decode(_raw_entry(small, codec, data, shape))
        assert err.value.code.value == "bad_tensor"


@pytest.mark.parametrize("codec", CODECS)
def test_wrong_size_is_refused(codec: str) -> None:
    array = _activation()
    packed = compression.compress(codec, array.tobytes()[:-64])  # 64 bytes short
    with pytest.raises(WireError) as err:
        wire.decode(_raw_entry(array, codec, packed))
    assert err.value.code.value == "bad_tensor"


def test_zstd_frame_claiming_another_size_is_refused_from_its_header() -> None:
    array = _activation()
    frame = compression.compress("zstd", array.tobytes() + bytes(4096))
    with pytest.raises(WireError, match="declares") as err:
        wire.decode(_raw_entry(array, "zstd", frame))
    assert err.value.code.value == "bad_tensor"


@pytest.mark.parametrize("codec", CODECS)
def test_corrupt_and_trailing_data_is_refused(codec: str) -> None:
    array = _activation()
    packed = compression.compress(codec, array.tobytes())
    corrupt = packed[:8] + bytes(len(packed) - 8)
    for data in (corrupt, packed + b"\x00" * 3, packed[: len(packed) // 2]):
        with pytest.raises(WireError) as err:
            wire.decode(_raw_entry(array, codec, data))
        assert err.value.code.value == "bad_tensor"


@pytest.mark.parametrize("z", ["gzip", "", 7, None, ["zstd"]])
def test_unknown_codec_is_refused_naming_the_supported(z: object) -> None:
    array = _activation()
    with pytest.raises(WireError, match="zstd") as err:
        wire.decode(_raw_entry(array, z, b"\x00" * 10))
    assert err.value.code.value == "bad_tensor"
    assert "'z'" in str(err.value)


def test_compressed_bytes_not_smaller_than_raw_are_refused() -> None:
    array = _activation((1, 8))
    with pytest.raises(WireError, match="smaller") as err:
        wire.decode(_raw_entry(array, "zstd", bytes(array.nbytes)))
    assert err.value.code.value == "bad_tensor"


def test_encoder_refuses_an_unknown_codec() -> None:
    with pytest.raises(WireError, match="unknown compression"):
        wire.encode(_request(wire.WireTensor("x", _activation(), compression="gzip")))


def test_pays_rule() -> None:
    # 100 kB saving on 5.85 Mbit/s = 137 ms of link time: pays against 1 ms of codec
    assert compression.pays(200_000, 100_000, 1e-3)
    # saves 2%: below MIN_SAVING whatever the link
    assert not compression.pays(100_000, 98_000, 0.0)
    # 10 kB saving on a 1 Gbit/s link = 80 us < 1 ms codec time
    assert not compression.pays(20_000, 10_000, 1e-3, link_bps=1e9)
    assert not compression.pays(0, 0, 0.0)


def test_choose_uses_an_injected_clock() -> None:
    ticks = iter(range(10_000))
    requests = [[_activation().tobytes()]]
    best, found = compression.choose(requests, timer=lambda: next(ticks) * 1e-6)
    assert best in CODECS and {m.codec for m in found} == set(CODECS)
    assert all(m.ratio > 1 for m in found)


def test_compression_with_an_image_codec_is_refused() -> None:
    body = msgpack.unpackb(_raw_entry(_activation(), "zstd", b"\x00"))
    body["t"][0]["c"] = "png"
    body["t"][0]["b"] = [b"\x00"]
    with pytest.raises(WireError, match="'z'") as err:
        wire.decode(msgpack.packb(body, use_bin_type=True))
    assert err.value.code.value == "bad_tensor"



@pytest.fixture(scope="module")
def digits_manifest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from splitter import split_model
    from splitter.zoo import digits_cnn_path

    result = split_model(digits_cnn_path(), "cloud_only", tmp_path_factory.mktemp("m"),
                         num_samples=1)
    return result.manifest_obj.to_dict()


def test_manifest_compression_round_trips(digits_manifest: dict[str, Any]) -> None:
    from splitinfer.manifest import Manifest

    assert "compression" not in digits_manifest
    assert Manifest.from_dict(digits_manifest).compression is None
    m = Manifest.from_dict({**digits_manifest, "compression": "zstd"})
    assert m.compression == "zstd" and m.to_dict()["compression"] == "zstd"


@pytest.mark.parametrize("bad", ["gzip", "", "ZSTD", 1])
def test_manifest_compression_is_validated(digits_manifest: dict[str, Any], bad: object) -> None:
    from splitinfer.errors import ManifestError
    from splitinfer.manifest import Manifest

    with pytest.raises(ManifestError, match="compression"):
        Manifest.from_dict({**digits_manifest, "compression": bad})


# -- the encoder's rule: only where it is worth the receiver's decompression ------------------

def test_small_and_barely_compressible_tensors_go_raw() -> None:
    tiny = np.zeros((1, compression.MIN_BYTES - 1), dtype=np.int8)  # compresses 100x, too small
    payload = wire.encode(_request(wire.WireTensor("x", tiny)), compression="zstd")
    assert "z" not in msgpack.unpackb(payload)["t"][0]
    # 4 % of zeros in noise: zstd shrinks it a little, less than MIN_SAVING
    rng = np.random.default_rng(2)
    noise = rng.integers(-128, 128, size=(1, 8192), dtype=np.int8)
    noise[0, :320] = 0
    frame = compression.compress("zstd", noise.tobytes())
    assert len(frame) < noise.nbytes and not compression.worth_sending(noise.nbytes, len(frame))
    payload = wire.encode(_request(wire.WireTensor("x", noise)), compression="zstd")
    assert "z" not in msgpack.unpackb(payload)["t"][0]
    assert compression.worth_sending(1000, 950) and not compression.worth_sending(1000, 951)
    assert not compression.worth_sending(compression.MIN_BYTES - 1, 0)


def test_report_counts_what_the_encoder_sends() -> None:
    ticks = iter(range(100_000))
    act = _activation().tobytes()  # 1 KiB, compressible
    small = bytes(compression.MIN_BYTES - 1)  # counted raw, never timed
    doc = compression.report([[act, small], [act, small]], ["zstd"],
                             timer=lambda: next(ticks) * 1e-6)
    z = doc["codecs"]["zstd"]
    assert doc["requests"] == 2 and doc["raw_bytes"] == len(act) + len(small) == z["raw_bytes"]
    assert z["compressed_bytes"] == len(compression.compress("zstd", act)) + len(small)
    # 1 µs a tick: compress and decompress of the one big tensor each take one tick
    assert z["compress_ms"] == pytest.approx(1e-3) and z["decompress_ms"] == pytest.approx(1e-3)
    assert z["pays"] is True and doc["choice"] == "zstd"
    assert doc["link_bps"] == compression.REFERENCE_UPLINK_BPS


def test_answer_compression_follows_the_request() -> None:
    from cloud_service.worker import answer_compression

    arr = _activation()
    raw = wire.decode(wire.encode(_request(wire.WireTensor("x", arr))))
    packed = wire.decode(wire.encode(_request(wire.WireTensor("x", arr)), compression="lz4"))
    assert answer_compression(raw) is None
    assert answer_compression(packed) == "lz4"


# -- splitting with --compression, the profiles and the cost model ---------------------------

INT8_CUT = "relu2_QuantizeLinear_Output"  # the digits CNN's int8 ReLU cut, 2 KiB a sample


@pytest.fixture(scope="module")
def int8_splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root with none/ and zstd/: the int8 digits CNN cut at INT8_CUT, samples.npz)."""
    from splitter import split_model, zoo
    from splitter.quantize import quantize_static

    root = tmp_path_factory.mktemp("int8")
    model = quantize_static(zoo.digits_cnn_path(), zoo.digits_calibration_path(),
                            root / "digits_int8.onnx")
    images, _ = zoo.digits_test_set()
    np.savez(root / "samples.npz", image=images[:16])
    for mode in ("none", "zstd", "auto"):
        split_model(model, [INT8_CUT], root / mode, samples=root / "samples.npz",
                    compression=mode, model_name="digits_int8")
    return root, root / "samples.npz"


def test_split_records_the_measured_compression(int8_splits: tuple[Path, Path]) -> None:
    from splitinfer.manifest import Manifest

    root, _ = int8_splits
    assert Manifest.load(root / "none").compression is None
    assert "compression" not in Manifest.load(root / "none").verification
    for mode in ("zstd", "auto"):
        m = Manifest.load(root / mode)
        measured = m.verification["compression"]
        z = measured["codecs"]["zstd"]
        assert measured["mode"] == mode and measured["requests"] == 16
        assert z["raw_bytes"] == 2048 and z["compressed_bytes"] < 0.85 * 2048
        # trained ReLU activations, saving ~0.7 KB for µs of codec time: it pays on 4g
        assert z["pays"] and m.compression == measured["choice"] == "zstd"


def test_auto_keeps_nothing_that_does_not_pay() -> None:
    from splitter.split import measure_compression

    noise = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    measured = measure_compression([[noise]] * 3, "auto")
    assert measured["choice"] is None and not measured["codecs"]["zstd"]["pays"]
    assert measure_compression([[noise]], "zstd")["choice"] == "zstd"  # as asked


def test_profiles_and_cost_model_use_the_compressed_bytes(int8_splits: tuple[Path, Path]
                                                          ) -> None:
    from splitinfer.costmodel import LinkEstimate, costs_from_profiles, predict
    from splitter.planner import profile as prof

    root, npz = int8_splits
    edge = {m: prof.profile(root / m, "edge", samples=npz, max_samples=8)
            for m in ("none", "zstd")}
    cloud = {m: prof.profile(root / m, "cloud", samples=npz, max_samples=4, batches=(1,),
                             repeats=1) for m in ("none", "zstd")}
    (sid,) = edge["none"]["splits"]
    plain, packed = edge["none"]["splits"][sid], edge["zstd"]["splits"][sid]
    assert plain["compression"] is None and packed["compression"] == "zstd"
    # both report what zstd would do to the same head outputs; only the zstd split sends it
    z = plain["compressed"]["codecs"]["zstd"]
    assert z == {**packed["compressed"]["codecs"]["zstd"],
                 "compress_ms": z["compress_ms"], "decompress_ms": z["decompress_ms"]}
    assert plain["cut_bytes"] == z["raw_bytes"] == 2048
    assert packed["cut_bytes"] == z["compressed_bytes"] < 0.85 * 2048
    z_entry = len(msgpack.packb({"z": "zstd"})) - 1  # the tensor's "z" field: 7 bytes
    assert packed["request_bytes"] == (plain["request_bytes"] - (2048 - z["compressed_bytes"])
                                       + z_entry)
    link = LinkEstimate(up_bps=5.85e6, down_bps=1e7, delay_s=0.02)
    (raw_costs,) = [c for c in costs_from_profiles(edge["none"], cloud["none"])
                    if c.split_id == sid]
    (zstd_costs,) = [c for c in costs_from_profiles(edge["zstd"], cloud["zstd"])
                     if c.split_id == sid]
    assert zstd_costs.request_bytes == packed["request_bytes"]
    saved = (raw_costs.request_bytes - zstd_costs.request_bytes) * 8 / link.up_bps
    up_raw, up_zstd = predict(raw_costs, link).uplink_s, predict(zstd_costs, link).uplink_s
    assert up_raw - up_zstd == pytest.approx(saved, rel=1e-6)


@pytest.mark.parametrize("codec", CODECS)
def test_contexts_survive_bad_frames_and_threads(codec: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    raw = _activation().tobytes()
    good = compression.compress(codec, raw)
    with pytest.raises(compression.CodecError):
        compression.decompress(codec, good[:8] + bytes(len(good) - 8), len(raw))
    assert compression.decompress(codec, good, len(raw)) == raw  # the cached context is fine

    def both(i: int) -> bool:
        data = raw[i:] + raw[:i]
        return all(compression.decompress(codec, compression.compress(codec, data),
                                          len(data)) == data for _ in range(50))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(both, range(16)))


def test_inspect_measures_what_the_split_sends(int8_splits: tuple[Path, Path]) -> None:
    from splitinfer.manifest import Manifest
    from splitter.cuts import inspect_model, open_index
    from splitter.wirebytes import measure_cuts

    root, npz = int8_splits
    index = open_index(root / "digits_int8.onnx")
    cuts = inspect_model(index, max_tensors=1).cuts
    with np.load(npz) as data:
        samples = {"image": data["image"]}
    per_cut, summary = measure_cuts(index, cuts, samples, num_samples=16, codecs=["zstd"])
    assert summary == {"codecs": ["zstd"], "samples": 16, "source": "file"}
    (measured,) = [m for c, m in zip(cuts, per_cut, strict=True) if c.names == (INT8_CUT,)]
    assert measured is not None
    split = Manifest.load(root / "zstd").verification["compression"]["codecs"]["zstd"]
    # the same 16 requests: the bytes inspect reports are the bytes the split's head sends
    assert measured["codecs"]["zstd"]["compressed_bytes"] == split["compressed_bytes"]
    assert measured["raw_bytes"] == split["raw_bytes"] == 2048
    assert per_cut[-1] is None and cuts[-1].kind == "edge_only"
