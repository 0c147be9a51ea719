"""bench/bench_compression.py (the docs/wire.md table): one model, real splits, real codecs."""

from __future__ import annotations

import math

from bench.bench_compression import format_table, run
from splitinfer import compression


def test_digits_rows_and_table() -> None:
    doc = run(["digits_cnn"], samples=3, repeats=1)
    rows = doc["rows"]
    assert len(rows) == 3 and {r["model"] for r in rows} == {"digits_cnn"}
    assert all(r["dtype"] in ("int8", "uint8") for r in rows)
    for r in rows:
        assert set(r["codecs"]) == set(compression.supported())
        for c in r["codecs"].values():
            assert c["ratio"] >= 1.0 and c["compressed_bytes"] <= r["raw_bytes"]
            assert math.isfinite(c["added_us"]) and c["compress_us"] >= 0
        # what split --compression auto recorded is what measuring the same requests keeps
        assert r["auto"] == r["auto_measured"]
        if r["raw_bytes"] < compression.MIN_BYTES:  # never compressed, never timed
            assert r["codecs"]["zstd"]["ratio"] == 1.0 and r["auto"] is None
    table = format_table(doc).splitlines()
    assert table[0].startswith("| model | cut (int8 tensor) | raw B | zstd ratio")
    assert "zstd added µs" in table[0] and len(table) == 2 + len(rows)
