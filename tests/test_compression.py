"""Compressed tensors on the wire (splitinfer.compression, wire "z"): round trip, bounds."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from splitinfer import compression, wire
from splitinfer.errors import WireError

pytest.importorskip("zstandard")


def _env(array: np.ndarray, z: str | None = None) -> wire.Envelope:
    return wire.Envelope("req", "r1", "dev", "s", tensors=[wire.WireTensor("x", array,
                                                                           compression=z)])


def _sparse() -> np.ndarray:
    a = np.zeros((1, 64, 8, 8), np.int8)
    a[0, 0] = 5
    return a


@pytest.mark.parametrize("codec", compression.supported())
def test_round_trip_is_bit_exact_and_smaller(codec: str) -> None:
    a = _sparse()
    payload = wire.encode(_env(a), codec)
    assert len(payload) < a.nbytes
    got = wire.decode(payload).tensors[0]
    assert got.compression == codec
    assert np.array_equal(got.array, a)


def test_incompressible_tensor_travels_raw() -> None:
    a = np.random.default_rng(0).integers(-128, 127, (1, 4096), dtype=np.int8)
    body = msgpack.unpackb(wire.encode(_env(a, "zstd")))
    assert "z" not in body["t"][0]


def _hostile(z: object, b: bytes, shape: list[int]) -> bytes:
    env = {"v": 1, "k": "req", "id": "r", "dev": "d", "split": "s", "dl": 0.0, "ts": {},
           "t": [{"n": "x", "d": "int8", "s": shape, "b": b, "z": z}]}
    return msgpack.packb(env, use_bin_type=True)


def test_frame_claiming_more_than_shape_is_refused() -> None:
    bomb = compression.compress("zstd", bytes(1 << 20))  # 1 MiB of zeros in ~40 bytes
    with pytest.raises(WireError, match="declares 1048576 bytes") as exc:
        wire.decode(_hostile("zstd", bomb, [1, 1024]))
    assert exc.value.code.value == "bad_tensor"


def test_unknown_compression_names_supported() -> None:
    with pytest.raises(WireError, match=r"'z' .*not supported here; expected one of"):
        wire.decode(_hostile("brotli", b"\x00" * 4, [1, 64]))


def test_corrupt_and_trailing_data_refused() -> None:
    good = compression.compress("zstd", bytes(1024))
    with pytest.raises(WireError, match="zstd"):
        wire.decode(_hostile("zstd", good + b"xx", [1, 1024]))
    with pytest.raises(WireError, match="zstd"):
        wire.decode(_hostile("zstd", b"\x28\xb5\x2f\xfd" + b"\x00" * 8, [1, 1024]))


def test_pays_rule() -> None:
    assert compression.pays(100_000, 50_000, 0.001)  # 50 kB at 5.85 Mbit/s ≈ 68 ms
    assert not compression.pays(100_000, 98_000, 0.0)  # under MIN_SAVING
    assert not compression.pays(1_000, 500, 0.01)  # 0.7 ms saved, 10 ms spent
