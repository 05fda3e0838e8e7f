"""Model stages on several processes: the launcher's processes, their threads, and work spread
across them with results gathered in a fixed order.

A stage runs under ``compute.launcher`` (``python``, ``torchrun --nproc_per_node 4``,
``accelerate launch --num_processes 4``); both launchers set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``. :func:`start` joins the process group (gloo on the CPU,
NCCL on GPUs). :func:`ordered_across_processes` hands the units of work out round-robin and
yields every result, on every rank, in the order of the units, so what rank 0 writes is the same
bytes as a one-process run. Only rank 0 writes; the stages let the other ranks stop after the
model's work.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from rosmap_geneformer.errors import InputError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# torch's own default (one thread per physical core, or OMP_NUM_THREADS), read before any stage
# changes it: ``auto`` for one process keeps it, so one-process runs are what they were.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the launcher's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the outputs."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        msg = f"environment variable {name}={value!r} is not an integer; it is set by the launcher."
        raise InputError(msg) from None


def current() -> Processes:
    """This process's place, from the launcher's environment (one process without it)."""
    world_size = _env_int("WORLD_SIZE", 1)
    return Processes(
        rank=_env_int("RANK", 0),
        world_size=world_size,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world_size),
    )


def start(threads: int | str = "auto") -> Processes:
    """Join the launcher's process group (no-op for one process), set this process's torch
    threads (:func:`configure_threads`) and return its place.

    On GPUs each process takes the GPU of its local rank.
    """
    processes = current()
    configure_threads(threads, processes)
    if processes.world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(processes.local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
        logger.info(
            "process %d of %d (%s, local rank %d)",
            processes.rank,
            processes.world_size,
            backend,
            processes.local_rank,
        )
    return processes


def end(*, wait: bool = True) -> None:
    """Leave the process group, after waiting for every process when ``wait``.

    A rank that exits with the group alive can abort in gloo's teardown ("terminate called
    without an active exception"), failing the whole launch. Stages whose rank 0 goes on alone
    after the last exchange (writing, CPU-only baselines) leave without waiting: a barrier would
    time out while rank 0 works.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def resolve_threads(threads: int | str, processes: Processes) -> int:
    """``compute.threads`` as a number.

    ``auto``: ``OMP_NUM_THREADS`` when set (``torchrun`` sets 1 for several processes; a user may
    set it for a shared machine), else torch's default (one per physical core) shared among the
    launcher's processes on this machine, at least one each.
    """
    if threads == "auto":
        omp = _env_int("OMP_NUM_THREADS", 0)
        if omp > 0:
            return omp
        return max(1, TORCH_DEFAULT_THREADS // max(1, processes.local_world_size))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        msg = f"params.yaml: compute.threads={threads!r}; use a positive integer or 'auto'."
        raise InputError(msg)
    return threads


def configure_threads(threads: int | str, processes: Processes) -> int:
    """Set torch's intra-op threads from ``compute.threads`` and log the choice.

    More threads than cores spin against each other: on two shared cores a pretraining step
    took 6-8 s with torch's default and 1.5 s with one thread.
    """
    chosen = resolve_threads(threads, processes)
    torch.set_num_threads(chosen)
    logger.info(
        "compute.threads=%s: %d torch thread(s) per process, %d process(es) on this machine, "
        "%s CPU(s) in it",
        threads,
        chosen,
        processes.local_world_size,
        os.cpu_count(),
    )
    return chosen


def ordered_across_processes(
    units: Sequence[T], work: Callable[[T], R], processes: Processes
) -> Iterator[R]:
    """``work(unit)`` for every unit, spread over the processes, yielded in order on every rank.

    Round ``k`` gives unit ``k * world_size + rank`` to each rank and then shares the round's
    results with every rank, so a process holds one round at a time and whatever it computes
    from the results is what one process would compute. Every rank must iterate to the end
    (the exchanges are collective).

    Parameters
    ----------
    units
        The work, in the order the results are wanted (the same on every rank).
    work
        Computes one unit's result (picklable for more than one process).
    processes
        From :func:`start`.
    """
    if processes.world_size == 1:
        for unit in units:
            yield work(unit)
        return
    size = processes.world_size
    for first in range(0, len(units), size):
        mine = first + processes.rank
        result = work(units[mine]) if mine < len(units) else None
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, result)
        yield from gathered[: min(size, len(units) - first)]


def broadcast_from_main(value: T, processes: Processes) -> T:
    """Rank 0's ``value`` on every rank (the others pass anything); one process: ``value``.

    For decisions one process must take for all, such as which trial to train next or whether
    to prune it.
    """
    if processes.world_size == 1:
        return value
    box = [value if processes.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def sum_over_processes(values: Sequence[float], processes: Processes) -> list[float]:
    """Per position, the sum over processes (every rank gets it); one process: unchanged."""
    if processes.world_size == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a process group started by hand."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launcher_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables ``torchrun --standalone`` gives process ``rank`` on one machine, for
    processes started by hand (``torch.multiprocessing``: tests, benchmarks)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
    }
