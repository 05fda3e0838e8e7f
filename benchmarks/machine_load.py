"""How busy the machine is, so that benchmarks time their runs on an otherwise idle machine.

Imported by the benchmark scripts, which run as ``python benchmarks/<name>.py`` (so this folder is
on ``sys.path``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def busy_cpus(seconds: float = 1.0) -> float:
    """How many CPUs were busy over the last ``seconds`` (from ``/proc/stat``).

    Parameters
    ----------
    seconds
        Sampling interval.

    Returns
    -------
    float
        Busy CPUs, from 0 to ``os.cpu_count()``.
    """

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    busy = 1 - (idle1 - idle0) / max(total1 - total0, 1)
    return round(busy * (os.cpu_count() or 1), 2)


def wait_for_quiet(limit_s: float, *, poll_s: float = 2.0) -> float:
    """Wait (up to ``limit_s``) until other processes keep less than 0.3 CPU busy.

    Parameters
    ----------
    limit_s
        Longest wait in seconds.
    poll_s
        Sampling interval while waiting.

    Returns
    -------
    float
        Busy CPUs at the last sample.
    """
    deadline = time.monotonic() + limit_s
    busy = busy_cpus()
    while busy > 0.3 and time.monotonic() < deadline:
        busy = busy_cpus(poll_s)
    return busy
