"""Ordered maps over worker processes (the dask.distributed path is tested with qc, in tests/data)."""

from __future__ import annotations

import os

import pytest

from rosmap_geneformer import parallel


def square_and_pid(value: int) -> tuple[int, int]:
    return value * value, os.getpid()


def test_ordered_map_keeps_input_order_on_worker_processes() -> None:
    results = list(parallel.ordered_map(square_and_pid, range(12), workers=2))
    assert [r[0] for r in results] == [i * i for i in range(12)]
    assert os.getpid() not in {pid for _, pid in results}  # really ran elsewhere


def test_resolve_workers() -> None:
    assert parallel.resolve_workers("auto") == parallel.available_cpus() >= 1
    assert parallel.resolve_workers(3) == 3
    for bad in (0, -1, "2", 1.5, True):
        with pytest.raises(ValueError, match=r"compute\.workers"):
            parallel.resolve_workers(bad)
