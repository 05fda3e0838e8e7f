"""The one small harness every benchmark in this folder uses.

- **A quiet machine**: :func:`wait_quiet` waits (bounded) until other processes keep fewer than
  ``threshold`` CPUs busy, and returns the load the run then started under.
- **Timing and memory**: :func:`run_measured` runs a command and samples its whole process tree
  (the process and every descendant) every ``sample_s`` seconds with psutil: wall time, CPU time
  and the peak of the summed RSS. :func:`run_worker` runs a function of a benchmark script in a
  fresh interpreter that way (``--worker CONFIG --result FILE``) and returns its result with the
  measurement and the load under ``process``; :func:`alternate` repeats several configurations
  in turn, so that drifting load hits every side of a comparison alike.
- **What the figures depend on**: :func:`machine_context`: CPU model, flags and cores, memory,
  numpy's SIMD baseline and found/not-found dispatch targets (as ``numpy.show_runtime()`` prints
  them), :func:`sort_dispatch` (whether numpy's argsort runs a SIMD kernel here, measured, with
  sort/argsort times), BLAS, torch's threads and CPU capability, the load averages. The sort
  dispatch and the load are also copied beside every measured figure.
- **Honest comparisons**: :func:`quoted` labels a figure measured elsewhere (never divided into
  this run's figures); :func:`ratio` and :func:`best_of` serve same-run comparisons.
- **JSON**: :func:`start_report` / :func:`finish_report` (load after the run) and
  :func:`write_json` (atomic; numpy scalars and paths converted, non-finite floats as null).

The CPU time of a tree is the larger of two lower bounds: the ``cpu_times`` psutil last saw for
each process (misses at most the last sample interval of each, and processes shorter than one
interval) and the ``RUSAGE_CHILDREN`` delta (complete for descendants that were waited for).
Summed RSS counts pages that forked workers share with their parent once per process: an upper
bound of the memory actually used.

The benchmark scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path``;
``python benchmarks/harness.py -- <command>`` measures one command and prints the JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
QUIET_CPUS = 0.3  # other load below which the machine counts as quiet


# ------------------------------------------------------------------------------------------
# Load


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def busy_cpus(seconds: float = 1.0) -> float:
    """How many CPUs were busy over the next ``seconds`` (from ``/proc/stat``).

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


def wait_quiet(
    limit_s: float, *, threshold: float = QUIET_CPUS, poll_s: float = 2.0, first_s: float = 1.0
) -> dict[str, Any]:
    """Wait up to ``limit_s`` until other processes keep fewer than ``threshold`` CPUs busy.

    Parameters
    ----------
    limit_s
        Longest wait in seconds; 0 only samples the load once (``first_s``).
    threshold
        Busy CPUs below which the machine counts as quiet.
    poll_s
        Sampling interval while waiting.
    first_s
        Length of the first sample.

    Returns
    -------
    dict
        ``busy_cpus_before`` (last sample), ``loadavg_before``, ``waited_s`` and ``quiet``
        (False: the run starts under load, after the wait timed out).
    """
    start = time.monotonic()
    busy = busy_cpus(first_s)
    while busy >= threshold and time.monotonic() - start < limit_s:
        busy = busy_cpus(poll_s)
    return {
        "busy_cpus_before": busy,
        "loadavg_before": loadavg(),
        "waited_s": round(time.monotonic() - start, 1),
        "quiet": busy < threshold,
    }


# ------------------------------------------------------------------------------------------
# Machine


def _numpy_cpu() -> tuple[list[str], dict[str, bool], list[str]]:
    """numpy's SIMD baseline, feature map and dispatch targets."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy < 2
        from numpy.core import _multiarray_umath as umath
    return (
        list(getattr(umath, "__cpu_baseline__", [])),
        dict(getattr(umath, "__cpu_features__", {})),
        list(getattr(umath, "__cpu_dispatch__", [])),
    )


@functools.cache
def sort_dispatch() -> dict[str, Any]:
    """Whether numpy's ``argsort`` runs a SIMD kernel here, and how fast ``sort``/``argsort`` are.

    On x86, numpy dispatches ``sort`` of 32/64-bit numbers to x86-simd-sort (AVX512_SKX, else
    AVX2); whether ``argsort`` has an AVX2 kernel depends on the numpy version, so it is
    measured: a SIMD argsort is several times faster than the scalar heapsort, a scalar
    introsort is not. The tokenizer ranks each cell with one argsort of float64, so this and the
    load are what two tokenizer figures must share to be compared.

    Returns
    -------
    dict
        ``target`` (``argsort``'s: the best SIMD level numpy found when argsort is measured to
        be SIMD, else ``"scalar"``), ``argsort_simd``, and the time in microseconds of one
        ``sort``, ``argsort`` and ``argsort(kind="heapsort")`` of 2,048 random float64 (best of
        3 passes over 200 arrays, interleaved so that load hits all three alike).
    """
    import numpy as np

    _, features, _ = _numpy_cpu()
    rows = np.random.default_rng(0).random((200, 2048))
    kinds = {
        "sort": np.sort,
        "argsort": np.argsort,
        "argsort_heapsort": functools.partial(np.argsort, kind="heapsort"),
    }
    best = dict.fromkeys(kinds, math.inf)
    for _ in range(3):
        for name, fn in kinds.items():
            start = time.perf_counter()
            for row in rows:
                fn(row)
            best[name] = min(best[name], (time.perf_counter() - start) / len(rows))
    simd = best["argsort"] < 0.5 * best["argsort_heapsort"]
    level = next((t for t in ("AVX512_SKX", "AVX2") if features.get(t)), "SIMD")
    return {
        "target": level if simd else "scalar",
        "argsort_simd": simd,
        **{f"{name}_float64_2048_us": round(t * 1e6, 1) for name, t in best.items()},
    }


def _torch_context() -> dict[str, Any] | None:
    """torch's version, threads and CPU capability (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    return {
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine_context(*, torch: bool = False) -> dict[str, Any]:
    """What the figures depend on: CPU, cores, memory, numpy SIMD and sort dispatch, BLAS, load.

    Parameters
    ----------
    torch
        Also record torch's version, threads and CPU capability (imports torch).

    Returns
    -------
    dict
        Plain JSON values.
    """
    import numpy as np

    model, flags = None, []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                wanted = ("avx", "amx", "fma", "sse4")
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(wanted))
    baseline, features, dispatch = _numpy_cpu()
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = {k: blas.get(k) for k in ("name", "version", "openblas configuration") if k in blas}
    except Exception:  # older numpy: no mode="dicts"
        blas = None
    context = {
        "cpu_model": model or platform.processor() or "unknown",
        "cpu_flags": flags,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_mb": round(psutil.virtual_memory().total / MB),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_simd": {
            "baseline": baseline,
            "found": [t for t in dispatch if features.get(t)],
            "not_found": [t for t in dispatch if not features.get(t)],
            "features_found": [name for name, found in features.items() if found],
        },
        "sort_dispatch": sort_dispatch(),
        "blas": blas,
        "loadavg_at_start": loadavg(),
    }
    if torch:
        context["torch"] = _torch_context()
    return context


# ------------------------------------------------------------------------------------------
# Measuring


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
    cmd: Sequence[str | Path],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    sample_s: float = 0.05,
    wait_quiet_s: float = 0.0,
    load_sample_s: float = 1.0,
    log: str | Path | None = None,
    echo: bool = True,
    tail_lines: int = 40,
) -> dict[str, Any]:
    """Wait for a quiet machine, then run ``cmd`` to its end, measuring its process tree.

    Parameters
    ----------
    cmd
        The command and its arguments.
    cwd, env
        Working directory and environment of the command (default: this process's).
    sample_s
        Interval between memory and CPU samples.
    wait_quiet_s
        Longest wait for a quiet machine (:func:`wait_quiet`) before starting.
    load_sample_s
        Length of the first load sample (the busy CPUs recorded when there is no wait).
    log
        File that receives the command's output (stdout and stderr merged).
    echo
        Also copy the output to this process's stderr, as it comes.
    tail_lines
        Lines of output kept in the result (all of them go to ``log``).

    Returns
    -------
    dict
        ``returncode``, ``wall_s``, ``cpu_s`` (and both estimates), ``peak_rss_tree_mb``,
        ``peak_rss_main_mb``, ``max_processes``, the load before (:func:`wait_quiet`) and
        after, the sort dispatch and the output tail.
    """
    load = wait_quiet(wait_quiet_s, first_s=load_sample_s)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    cpu_seen: dict[tuple[int, float], float] = {}
    peak_tree = peak_main = max_processes = samples = 0
    with contextlib.ExitStack() as stack:
        log_handle = stack.enter_context(Path(log).open("w")) if log is not None else None
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(c) for c in cmd],
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
        "cpu_s_psutil": round(cpu_psutil, 3),
        "peak_rss_tree_mb": round(peak_tree / MB, 1),
        "peak_rss_main_mb": round(peak_main / MB, 1),
        "max_processes": max_processes,
        "processes_seen": len(cpu_seen),
        "samples": samples,
        "sample_s": sample_s,
        **load,
        "loadavg_after": loadavg(),
        "sort_dispatch": sort_dispatch()["target"],
        "output_tail": "".join(tail),
    }


def run_worker(
    script: str | Path,
    config: Mapping[str, Any],
    *,
    wait_quiet_s: float,
    env: Mapping[str, str] | None = None,
    echo: bool = False,
    load_sample_s: float = 1.0,
) -> dict[str, Any]:
    """Run ``python script --worker CONFIG --result FILE`` measured; the worker's result.

    Parameters
    ----------
    script
        A benchmark script whose ``main`` calls :func:`serve_worker`.
    config
        JSON-able configuration handed to the worker function.
    wait_quiet_s
        Longest wait for a quiet machine before the run.
    env
        Extra environment variables (``PYTHONPATH`` gets the checkout's ``src`` first).
    echo
        Copy the worker's output to stderr as it comes.
    load_sample_s
        As for :func:`run_measured`.

    Returns
    -------
    dict
        The worker's result, with the measurement (:func:`run_measured`, output tail left out)
        under ``process``.

    Raises
    ------
    RuntimeError
        When the worker fails.
    """
    full_env = {**os.environ, "ROSMAP_LOG_LEVEL": "WARNING", "TQDM_DISABLE": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), full_env.get("PYTHONPATH", "")) if p
    )
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, script, "--worker", json.dumps(dict(config))]
        process = run_measured(
            [*cmd, "--result", result_path],
            cwd=ROOT,
            env=full_env,
            wait_quiet_s=wait_quiet_s,
            load_sample_s=load_sample_s,
            echo=echo,
        )
        tail = process.pop("output_tail")
        if process["returncode"] != 0 or not result_path.is_file():
            msg = f"worker {config} failed (exit {process['returncode']}):\n{tail[-4000:]}"
            raise RuntimeError(msg)
        result = json.loads(result_path.read_text())
    process.pop("cmd")
    return {**result, "process": process}


def alternate(
    script: str | Path,
    configs: Mapping[str, Mapping[str, Any]],
    *,
    repeat: int,
    wait_quiet_s: float,
    show: str,
) -> dict[str, list[dict[str, Any]]]:
    """Run each configuration ``repeat`` times, alternating, so drifting load hits all alike.

    Parameters
    ----------
    script, wait_quiet_s
        As for :func:`run_worker`.
    configs
        Named worker configurations, run in this order within each repeat.
    repeat
        Rounds.
    show
        The figure printed to stderr after each run, with the load it started under.

    Returns
    -------
    dict
        Each name's runs, in order.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for _ in range(repeat):
        for name, config in configs.items():
            run = run_worker(script, config, wait_quiet_s=wait_quiet_s)
            runs[name].append(run)
            load = run["process"]
            print(
                f"{name}: {show} {run[show]} (busy CPUs before {load['busy_cpus_before']}, "
                f"load {load['loadavg_before']})",
                file=sys.stderr,
            )
    return runs


def worker_arguments(parser: argparse.ArgumentParser, *, wait_quiet_s: float = 120.0) -> None:
    """Add the hidden ``--worker``/``--result`` options and ``--wait-quiet`` to ``parser``."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=wait_quiet_s,
        help="longest wait (s) before each run for other load to drop below "
        f"{QUIET_CPUS} CPU; the load a run starts under is recorded either way",
    )


def serve_worker(args: argparse.Namespace, worker: Callable[[dict[str, Any]], Any]) -> bool:
    """In a worker process (``--worker`` given): run ``worker`` and write its result.

    Returns
    -------
    bool
        Whether this process was a worker (the caller then returns).
    """
    if not args.worker:
        return False
    write_json(worker(json.loads(args.worker)), args.result)
    return True


# ------------------------------------------------------------------------------------------
# Comparing and reporting


def best_of(
    runs: Sequence[Mapping[str, Any]],
    key: str,
    *,
    lowest: bool = False,
    also: Sequence[str] = (),
) -> dict[str, Any]:
    """The best of repeated runs, with every run's ``key`` and starting load beside it.

    Parameters
    ----------
    runs
        Results of :func:`run_worker` for one configuration.
    key
        The figure that ranks the runs.
    lowest
        The lowest ``key`` is best (a time), not the highest (a rate).
    also
        Other figures whose values in every run are kept too.

    Returns
    -------
    dict
        A copy of the best run plus ``<key>_all_runs`` (and ``<also>_all_runs``),
        ``busy_cpus_before_all_runs`` and ``loadavg_before_all_runs``.
    """
    best = dict((min if lowest else max)(runs, key=lambda r: r[key]))
    for name in (key, *also):
        best[f"{name}_all_runs"] = [r[name] for r in runs]
    best["busy_cpus_before_all_runs"] = [r["process"]["busy_cpus_before"] for r in runs]
    best["loadavg_before_all_runs"] = [r["process"]["loadavg_before"] for r in runs]
    return best


def ratio(numerator: float, denominator: float, digits: int = 2) -> float | None:
    """``numerator / denominator`` rounded; only for two figures measured in the same run."""
    return round(numerator / denominator, digits) if denominator else None


def quoted(figures: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """A figure measured elsewhere, labelled so: shown for context, never divided into ours.

    Parameters
    ----------
    figures
        The figures as published.
    source
        Where they come from (document and section, or issue).

    Returns
    -------
    dict
        ``{"kind": "quoted", "measured_in_this_run": False, "source": ..., "figures": ...}``.
    """
    return {
        "kind": "quoted",
        "measured_in_this_run": False,
        "source": source,
        "note": "measured elsewhere, under a load and CPU not recorded here: no speed-up is "
        "computed from it",
        "figures": dict(figures),
    }


def start_report(benchmark: str, *, torch: bool = False, **fields: Any) -> dict[str, Any]:
    """A report: the benchmark's name, the machine context and ``fields``."""
    return {"benchmark": benchmark, "machine": machine_context(torch=torch), **fields}


def load_after() -> dict[str, Any]:
    """The load when a benchmark ends: busy CPUs over one second and the load averages."""
    return {"busy_cpus": busy_cpus(1.0), "loadavg": loadavg()}


def finish_report(report: dict[str, Any], path: str | Path) -> None:
    """Record the load after the runs (:func:`load_after`) and write ``report`` to ``path``."""
    report["load_after"] = load_after()
    write_json(report, path)


def _plain(obj: Any) -> Any:
    """``obj`` with numpy values, paths and non-finite floats turned into plain JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, str):  # numpy scalars and arrays
        return _plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/harness.py [--wait-quiet S] -- <command...>``: measure one command."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--wait-quiet", type=float, default=0.0)
    parser.add_argument("--output", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    result = start_report("command")
    result["run"] = run_measured(command, wait_quiet_s=args.wait_quiet)
    if args.output:
        finish_report(result, args.output)
    else:
        result["load_after"] = {"loadavg": loadavg()}
        print(json.dumps(_plain(result), indent=2))
    sys.exit(result["run"]["returncode"])


if __name__ == "__main__":
    main()
