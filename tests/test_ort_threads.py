"""splitinfer.ort_config.usable_cpus / pool_threads: an explicit, quota-aware thread count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.runtime import OrtHead
from splitinfer import ort_config
from splitter import split_model, zoo


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_no_cgroup_files_means_the_affinity_mask(tmp_path: Path) -> None:
    assert ort_config.usable_cpus(tmp_path) == affinity()


@pytest.mark.parametrize(("cpu_max", "want"), [
    ("max 100000", None),       # no quota
    ("100000 100000", 1),       # one CPU
    ("150000 100000", 2),       # 1.5 CPUs: rounded up
    ("50000 100000", 1),        # half a CPU: at least one thread
    ("garbage", None),          # unreadable: ignored
])
def test_cgroup_v2_quota_caps_the_count(tmp_path: Path, cpu_max: str, want: int | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    expected = affinity() if want is None else min(affinity(), want)
    assert ort_config.usable_cpus(tmp_path) == expected


def test_cgroup_v1_quota_caps_the_count(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert ort_config.usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert ort_config.usable_cpus(tmp_path) == affinity()


def test_pool_threads_is_never_zero() -> None:
    assert ort_config.pool_threads(0) == ort_config.pool_threads(None) == ort_config.usable_cpus()
    assert ort_config.pool_threads(3) == 3


def test_the_head_gets_an_explicit_count(tmp_path: Path) -> None:
    split_model(zoo.digits_cnn_path(), ["pool"], tmp_path / "s", num_samples=2)
    head = OrtHead(tmp_path / "s" / "head.onnx")
    threads = head._session.get_session_options().intra_op_num_threads
    assert threads == ort_config.usable_cpus() >= 1

