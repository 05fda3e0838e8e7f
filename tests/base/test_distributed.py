"""Tests for rosmap_geneformer.distributed: threads, and work shared by real processes (gloo)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from builders import run_on_ranks
from rosmap_geneformer import distributed
from rosmap_geneformer.errors import InputError


def test_auto_threads_follow_omp_num_threads_else_share_the_cpus(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    one = distributed.Processes()
    four = distributed.Processes(rank=1, world_size=8, local_rank=1, local_world_size=4)
    default = distributed.TORCH_DEFAULT_THREADS
    assert default >= 1
    assert distributed.resolve_threads("auto", one) == default
    assert distributed.resolve_threads("auto", four) == max(1, default // 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.resolve_threads("auto", four) == 3
    assert distributed.resolve_threads(2, four) == 2
    for bad in (0, -1, "many", True):
        with pytest.raises(InputError, match=r"compute\.threads"):
            distributed.resolve_threads(bad, one)


def test_configure_threads_sets_torch(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        assert distributed.configure_threads(1, distributed.Processes()) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_launchers_environment_gives_the_place(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.current() == distributed.Processes()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    place = distributed.current()
    assert place == distributed.Processes(3, 4, 1, 2) and not place.is_main
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(InputError, match="WORLD_SIZE"):
        distributed.current()


def _share(rank: int, world_size: int, port: int, queue: mp.Queue) -> None:
    os.environ.update(distributed.launcher_environment(rank, world_size, port))
    os.environ["OMP_NUM_THREADS"] = "1"
    processes = distributed.start("auto")
    units = list(range(7))
    results = list(
        distributed.ordered_across_processes(
            units, lambda u: (u, u * u, distributed.current().rank), processes
        )
    )
    summed = distributed.sum_over_processes([1.0, float(rank)], processes)
    queue.put((rank, torch.get_num_threads(), results, summed))
    distributed.end()


def test_work_is_shared_round_robin_and_every_rank_gets_it_in_order() -> None:
    reports = run_on_ranks(_share, 2, timeout=120)
    assert not dist.is_initialized()
    for rank, threads, results, summed in reports:
        assert threads == 1, rank
        # Every rank holds every result, in the order of the units.
        assert [u for u, _, _ in results] == list(range(7))
        assert [sq for _, sq, _ in results] == [u * u for u in range(7)]
        # Unit k was computed by rank k % 2.
        assert [by for _, _, by in results] == [u % 2 for u in range(7)]
        assert summed == [2.0, 1.0]


def test_one_process_runs_everything_in_place() -> None:
    calls: list[int] = []
    out = list(
        distributed.ordered_across_processes(
            [3, 1, 2], lambda u: calls.append(u) or u * 10, distributed.Processes()
        )
    )
    assert out == [30, 10, 20] and calls == [3, 1, 2]
    assert distributed.sum_over_processes([1.5, 2.0], distributed.Processes()) == [1.5, 2.0]
