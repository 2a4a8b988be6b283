"""Where `pdserve serve` puts its workers: pure placement rules, and the flag end to end."""

from __future__ import annotations

import argparse

import pytest

from server.api.launch import add_serve_args, engine_configs
from server.worker.placement import Placement, cpu_threads, parse_gpus, place_workers


def test_cpu_workers_keep_the_device_and_memory_share() -> None:
    assert place_workers(3, "cpu", 0.9, visible_gpus=0) == [Placement("cpu", 0.9)] * 3
    assert place_workers(2, "auto", 0.9, visible_gpus=0) == [Placement("auto", 0.9)] * 2


def test_one_worker_per_gpu_round_robin() -> None:
    # 1 prefill + 1 decode on 2 GPUs: each its own GPU (the only one it sees) and the whole
    # fraction.
    assert place_workers(2, "auto", 0.9, visible_gpus=2) == [
        Placement("cuda:0", 0.9, "0"),
        Placement("cuda:0", 0.9, "1"),
    ]
    got = place_workers(2, "cuda", 0.8, visible_gpus=4)
    assert [p.visible_devices for p in got] == ["0", "1"]
    # Indices refer to the entries of this process's own CUDA_VISIBLE_DEVICES.
    got = place_workers(2, "auto", 0.8, visible_gpus=2, parent_visible="5, GPU-abc")
    assert [p.visible_devices for p in got] == ["5", "GPU-abc"]


def test_workers_sharing_a_gpu_split_its_memory() -> None:
    got = place_workers(3, "auto", 0.9, visible_gpus=2)
    assert [p.visible_devices for p in got] == ["0", "1", "0"]
    assert [p.gpu_memory_utilization for p in got] == pytest.approx([0.45, 0.9, 0.45])


def test_pinned_device_and_gpu_subset() -> None:
    got = place_workers(2, "cuda:1", 0.9, visible_gpus=2)
    assert got == [Placement("cuda:1", 0.45)] * 2  # pinned: sees every GPU, no narrowing
    got = place_workers(3, "auto", 0.6, visible_gpus=4, gpus=[2, 3])
    assert [p.visible_devices for p in got] == ["2", "3", "2"]
    assert [p.gpu_memory_utilization for p in got] == pytest.approx([0.3, 0.6, 0.3])


def test_missing_gpus_are_refused() -> None:
    with pytest.raises(ValueError, match=r"GPU\(s\) \[3\] requested but only 2 visible"):
        place_workers(2, "auto", 0.9, visible_gpus=2, gpus=[0, 3])
    with pytest.raises(ValueError, match="no CUDA device"):
        place_workers(1, "cuda", 0.9, visible_gpus=0)


def test_cpu_workers_split_the_cores() -> None:
    assert cpu_threads(2, 2) == 1
    assert cpu_threads(2, 16) == 8
    assert cpu_threads(3, 16) == 5
    assert cpu_threads(4, 2) == 1  # never zero
    assert cpu_threads(1, 8) == 8


def test_parse_gpus() -> None:
    assert parse_gpus(None) is None
    assert parse_gpus("all") is None
    assert parse_gpus("0, 2") == [0, 2]
    for bad in ("a,b", "-1", ","):
        with pytest.raises(ValueError, match="comma-separated GPU indices"):
            parse_gpus(bad)


def serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(argv)


def test_serve_flags_become_per_worker_engine_configs() -> None:
    args = serve_args(
        ["--device", "cpu", "--prefill-workers", "1", "--decode-workers", "2",
         "--max-num-seqs", "7"]
    )  # fmt: skip
    configs = engine_configs(args, 3)
    assert [c["device"] for c, _ in configs] == ["cpu"] * 3
    assert [env for _, env in configs] == [{}] * 3
    assert {c["max_num_seqs"] for c, _ in configs} == {7}
    # Three CPU workers on this host split its cores (at least one thread each).
    import os

    cores = len(os.sched_getaffinity(0))
    assert {c["num_threads"] for c, _ in configs} == {max(1, cores // 3)}
    # One worker keeps torch's default; --worker-threads always wins.
    assert engine_configs(args, 1)[0][0]["num_threads"] is None
    pinned = serve_args(["--device", "cpu", "--worker-threads", "5"])
    assert {c["num_threads"] for c, _ in engine_configs(pinned, 2)} == {5}
    bad = serve_args(["--device", "cpu", "--gpus", "x"])
    with pytest.raises(ValueError, match="comma-separated"):
        engine_configs(bad, 1)


def test_kv_budget_counts_only_this_process_against_its_share() -> None:
    from server.engine.gpu_memory import kv_budget

    gib = 1 << 30
    # Alone on a 140 GiB GPU at 0.9: 126 - 17 held - 1 context = 108, less peak 1 and reserve 1.
    assert kv_budget(140 * gib, 122 * gib, 17 * gib, gib, 0.9) == 106 * gib
    # Sharing at 0.45 after the neighbour took 62 GiB: the share (63 - 17 - 1 = 45) still fits.
    assert kv_budget(140 * gib, 60 * gib, 17 * gib, gib, 0.45) == 43 * gib
    # ...but never more than is free.
    assert kv_budget(140 * gib, 30 * gib, 17 * gib, gib, 0.45) == 28 * gib
    # Nothing left: negative, which the caller reports as an error.
    assert kv_budget(140 * gib, gib, 17 * gib, gib, 0.45) < 0
