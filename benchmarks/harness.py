"""A small shared benchmark harness: run a command in a subprocess and measure it.

:func:`run_measured` waits for a quiet machine (:mod:`machine_load`), starts the command, samples
the summed RSS of its whole process tree (the process and every descendant) every ``sample_s``
seconds with psutil and keeps the peak, and measures wall time and CPU time. The CPU time of the
tree is the larger of two lower bounds: the ``cpu_times`` psutil last saw for each process of the
tree (misses at most the last sample interval of each, and processes shorter than one interval),
and the ``RUSAGE_CHILDREN`` delta of this process (complete for descendants that were waited
for, blind to ones that were not). Summed RSS counts pages that forked workers share with their
parent once per process: an upper bound of the memory actually used.

:func:`machine_context` records what the numbers depend on: CPU model and count, memory, load,
numpy's SIMD features and BLAS. :func:`write_json` writes results atomically.

Imported by the benchmark scripts, which run as ``python benchmarks/<name>.py`` (so this folder is
on ``sys.path``); ``python benchmarks/harness.py -- <command>`` measures one command and prints
the JSON.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
from machine_load import busy_cpus, wait_for_quiet

MB = 2**20


def machine_context() -> dict[str, Any]:
    """CPU model and count, memory, load, Python and numpy (SIMD features found, BLAS)."""
    import numpy as np

    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy < 2
        from numpy.core import _multiarray_umath as umath
    features = getattr(umath, "__cpu_features__", {})
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = {k: blas.get(k) for k in ("name", "version", "openblas configuration") if k in blas}
    except Exception:  # older numpy: no mode="dicts"
        blas = None
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_mb": round(psutil.virtual_memory().total / MB),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_cpu_baseline": list(getattr(umath, "__cpu_baseline__", [])),
        "numpy_cpu_features_found": [name for name, found in features.items() if found],
        "blas": blas,
    }


def _tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and all its descendants (empty when ``root`` has ended)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _pump(stream: Any, *, echo: bool, log: Any, tail: collections.deque) -> None:
    for line in iter(stream.readline, ""):
        tail.append(line)
        if log is not None:
            log.write(line)
            log.flush()
        if echo:
            sys.stderr.write(line)
            sys.stderr.flush()


def run_measured(
    cmd: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    sample_s: float = 0.05,
    wait_quiet_s: float = 0.0,
    log: str | Path | None = None,
    echo: bool = True,
    tail_lines: int = 40,
) -> dict[str, Any]:
    """Run ``cmd`` to its end, measuring its process tree.

    Parameters
    ----------
    cmd
        The command and its arguments.
    cwd, env
        Working directory and environment of the command (default: this process's).
    sample_s
        Interval between memory and CPU samples.
    wait_quiet_s
        Wait up to this long for other load to drop below 0.3 CPU before starting (0: only
        sample the load for one second).
    log
        File that receives the command's output (stdout and stderr merged).
    echo
        Also copy the output to this process's stderr, as it comes.
    tail_lines
        Lines of output kept in the result (all of them go to ``log``).

    Returns
    -------
    ``returncode``, ``wall_s``, ``cpu_s`` (and both estimates), ``peak_rss_tree_mb``,
    ``peak_rss_main_mb``, ``max_processes``, ``samples``, the load just before and the output tail.
    """
    busy = wait_for_quiet(wait_quiet_s) if wait_quiet_s > 0 else busy_cpus(1.0)
    loadavg = [round(x, 2) for x in os.getloadavg()]
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    cpu_seen: dict[tuple[int, float], float] = {}
    peak_tree = peak_main = 0
    max_processes = samples = 0
    with contextlib.ExitStack() as stack:
        log_handle = stack.enter_context(Path(log).open("w")) if log is not None else None
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(map(str, cmd)),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        reader = threading.Thread(
            target=_pump,
            args=(proc.stdout,),
            kwargs={"echo": echo, "log": log_handle, "tail": tail},
        )
        reader.start()
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:  # already gone
            root = None
        while True:
            total = 0
            processes = _tree(root) if root is not None else []
            for p in processes:
                try:
                    with p.oneshot():
                        rss = p.memory_info().rss
                        times = p.cpu_times()
                        key = (p.pid, p.create_time())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                if p.pid == proc.pid:
                    peak_main = max(peak_main, rss)
                # Own time only: children's time shows up in their own entries.
                cpu_seen[key] = times.user + times.system
            peak_tree = max(peak_tree, total)
            max_processes = max(max_processes, len(processes))
            samples += 1
            try:  # returns as soon as the command ends, so the wall time is exact
                proc.wait(timeout=sample_s)
                break
            except subprocess.TimeoutExpired:
                pass
        wall = time.perf_counter() - start
        reader.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    cpu_psutil = sum(cpu_seen.values())
    return {
        "cmd": [str(c) for c in cmd],
        "returncode": proc.returncode,
        "wall_s": round(wall, 3),
        "cpu_s": round(max(user + system, cpu_psutil), 3),
        "cpu_s_rusage": round(user + system, 3),
        "cpu_user_s_rusage": round(user, 3),
        "cpu_sys_s_rusage": round(system, 3),
        "cpu_s_psutil": round(cpu_psutil, 3),
        "peak_rss_tree_mb": round(peak_tree / MB, 1),
        "peak_rss_main_mb": round(peak_main / MB, 1),
        "max_processes": max_processes,
        "processes_seen": len(cpu_seen),
        "samples": samples,
        "sample_s": sample_s,
        "busy_cpus_before": busy,
        "loadavg_before": loadavg,
        "output_tail": "".join(tail),
    }


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/harness.py [--wait-quiet S] -- <command...>``: measure one command."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--wait-quiet", type=float, default=0.0)
    parser.add_argument("--output", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    result = {
        "machine": machine_context(),
        "run": run_measured(command, wait_quiet_s=args.wait_quiet),
    }
    if args.output:
        write_json(result, args.output)
    else:
        print(json.dumps(result, indent=2))
    sys.exit(result["run"]["returncode"])


if __name__ == "__main__":
    main()
