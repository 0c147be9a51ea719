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



# --- the agent's head: one thread unless a pool pays, as the worker's tails -------------


def head_threads(head: object) -> int:
    return int(head._session.get_session_options().intra_op_num_threads)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("head-threads") / "split"
    split_model(zoo.digits_cnn_path(), ["pool"], out, num_samples=2)
    return out


def test_head_keeps_a_pool_only_where_it_pays(digits_split: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.runtime import load_head
    from splitinfer.manifest import Manifest

    manifest = Manifest.load(digits_split)
    monkeypatch.setattr(ort_config, "POOL_GAIN", 1e9)  # a pool never pays
    assert head_threads(load_head(manifest, digits_split)) == 1
    monkeypatch.setattr(ort_config, "POOL_GAIN", 0.0)  # one thread never wins
    assert head_threads(load_head(manifest, digits_split)) == ort_config.usable_cpus()
    monkeypatch.setattr(ort_config, "POOL_GAIN", 1e9)
    assert head_threads(load_head(manifest, digits_split, threads=2)) == 2  # asked for: kept


def test_best_times_interleaves_and_takes_the_best() -> None:
    calls: list[str] = []
    slow = iter([0.05, 0.0, 0.0, 0.0])

    def a() -> None:
        calls.append("a")

    def b() -> None:
        calls.append("b")
        import time
        time.sleep(next(slow, 0.0))

    best_a, best_b = ort_config.best_times((a, b), rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4  # in turn, warm-up included
    assert best_b < 0.04  # the slow first (warm-up) call is not counted
    assert best_a >= 0.0


def test_best_times_in_groups_warms_each_group() -> None:
    calls: list[str] = []
    best = ort_config.best_times((lambda: calls.append("a"), lambda: calls.append("b")),
                                 rounds=2, warmup=2, groups=3, gap_s=0.0)
    # 2 warm-up + 2 timed rounds, then per further group 1 warm-up + 2 timed rounds
    assert calls == ["a", "b"] * (4 + 3 + 3)
    assert len(best) == 2


def test_calibration_looks_again_before_one_thread_wins_a_long_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setattr(ort_config, "CALIBRATION_GAP_S", 0.0)
    monkeypatch.setattr(ort_config, "CALIBRATION_RECHECK_GAP_S", 0.0)
    looks = {"pool": 0}
    per_look = ((ort_config.CALIBRATION_GROUPS - 1) * (1 + ort_config.CALIBRATION_ROUNDS)
                + 2 + ort_config.CALIBRATION_ROUNDS)

    def pool() -> None:  # a pool with no speed-up during the first look, then twice as fast
        looks["pool"] += 1
        time.sleep(0.004 if looks["pool"] <= per_look else 0.001)

    def single() -> None:
        time.sleep(0.002)

    pool_s, single_s = ort_config.calibration_times(pool, single)
    assert looks["pool"] == 2 * per_look  # looked again once, then the pool won
    assert pool_s < 0.002 <= single_s
    assert single_s > pool_s * ort_config.POOL_GAIN

    short = {"n": 0}

    def quick() -> None:  # a short run: one thread winning it is not looked at again
        short["n"] += 1

    def slow_pool() -> None:
        time.sleep(0.0002)

    ort_config.calibration_times(slow_pool, quick)
    assert short["n"] == per_look
