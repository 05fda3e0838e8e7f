"""Per-library work on several processes and on a dask.distributed cluster: same results."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from rosmap_geneformer import counts, parallel, qc
from test_qc import SETTINGS, make_adata, run


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


@pytest.mark.slow
def test_qc_on_a_local_dask_cluster_equals_one_process(tmp_path: Path) -> None:
    from distributed import LocalCluster

    adata = make_adata(libraries=("L2", "L0", "L1", "L3"), cells=120)
    local = run(adata, tmp_path / "m.h5ad", split="train")
    table = counts.cell_table(adata.obs, np.ones(adata.n_obs, dtype=bool))
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        remote = qc.run_qc(
            table,
            tmp_path / "m.h5ad",
            batch_key="batch",
            settings=SETTINGS,
            split="train",
            scheduler=cluster.scheduler_address,
        )
    assert remote.report == local.report
    qc.write_reports(
        local, report=tmp_path / "a.json", plots=tmp_path / "a", cells=tmp_path / "a.parquet"
    )
    qc.write_reports(
        remote, report=tmp_path / "b.json", plots=tmp_path / "b", cells=tmp_path / "b.parquet"
    )
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
