"""Tail.open with threads=0 keeps a pool only where it is measured to pay (POOL_GAIN)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cloud_service import registry
from cloud_service.registry import Tail
from splitinfer import ort_config
from splitter import split_model, zoo


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("threads") / "split"
    split_model(zoo.digits_cnn_path(), ["pool"], out, num_samples=2)
    return out


def threads_of(tail: Tail) -> int:
    return int(tail.session.get_session_options().intra_op_num_threads)


def test_one_thread_when_the_pool_does_not_pay(split_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "POOL_GAIN", 1e9)  # any pool "fails" to pay
    assert threads_of(Tail.open(split_dir, spinning="always")) == 1


def test_pool_kept_when_it_pays(split_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "POOL_GAIN", 0.0)  # one thread never wins
    # a pool of every usable CPU, by number (onnxruntime's own default, 0, pins its threads)
    assert threads_of(Tail.open(split_dir)) == ort_config.pool_threads(0) >= 1


def test_explicit_threads_are_never_second_guessed(split_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "POOL_GAIN", 1e9)
    assert threads_of(Tail.open(split_dir, threads=2)) == 2


def test_unknown_dims_keep_the_default(split_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "POOL_GAIN", 1e9)
    tail = Tail.open(split_dir)
    spec = tail.manifest.cut[0]
    unknown = dataclasses.replace(spec, shape=(spec.shape[0], "h", *spec.shape[2:]))
    manifest = dataclasses.replace(tail.manifest, cut=(unknown,))
    kept = registry._fewest_threads(tail.session, split_dir / "tail.onnx", manifest, "off",
                                    ["CPUExecutionProvider"])
    assert kept is tail.session
