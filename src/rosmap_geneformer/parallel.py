"""Per-library and per-chunk work on several processes, with one ``workers`` setting.

joblib (loky processes) on one machine; a ``dask.distributed`` cluster when ``compute.scheduler``
names one. Results always come back in the order of the inputs, so what a stage writes does not
depend on how many workers computed it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def available_cpus() -> int:
    """The number of CPUs this process may use."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(workers: int | str) -> int:
    """``workers`` from params as a number of processes: ``auto`` is every available CPU.

    Raises
    ------
    ValueError
        For anything but a positive integer or ``auto``, naming ``compute.workers``.
    """
    if workers == "auto":
        return available_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        msg = f"params.yaml: compute.workers={workers!r}; use a positive integer or 'auto'."
        raise InputError(msg)
    return workers


def ordered_map(
    function: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int = 1,
    scheduler: str | None = None,
    desc: str = "",
    unit: str = "task",
) -> Iterator[R]:
    """``function(item)`` for every item, yielded in input order.

    Parameters
    ----------
    function
        A picklable (module-level) function.
    items
        Its inputs (picklable).
    workers
        Processes on this machine (1: in this process, no pool).
    scheduler
        Address of a ``dask.distributed`` scheduler (``tcp://host:8786``); when given, the
        items run on that cluster's workers and ``workers`` is not used.
    desc, unit
        For the progress bar.
    """
    items = list(items)
    progress = tqdm(total=len(items), desc=desc, unit=unit, disable=None)
    try:
        for result in _results(function, items, workers=workers, scheduler=scheduler):
            progress.update(1)
            yield result
    finally:
        progress.close()


def _results(
    function: Callable[[Any], Any], items: list[Any], *, workers: int, scheduler: str | None
) -> Iterator[Any]:
    if scheduler:
        from distributed import Client

        logger.info("running %d tasks on the Dask cluster at %s", len(items), scheduler)
        with Client(scheduler) as client:
            futures = client.map(function, items, pure=False)
            try:
                for future in futures:
                    yield future.result()
            finally:
                client.cancel(futures)
        return
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield function(item)
        return
    from joblib import Parallel, delayed

    logger.info("running %d tasks on %d processes", len(items), workers)
    # Two tasks in flight per worker: memory stays at a few libraries or chunks at a time.
    parallel = Parallel(n_jobs=workers, return_as="generator", pre_dispatch="2*n_jobs")
    yield from parallel(delayed(function)(item) for item in items)
