"""Embedding and perturbation throughput on 1 and 2 processes (not a test):
``python benchmarks/processes.py``.

On a Geneformer-V1-10M-shaped encoder (random seeded weights), each configuration runs the
stages' own code, :func:`rosmap_geneformer.analysis.embeddings.cell_embeddings` and
:func:`rosmap_geneformer.analysis.perturbation.engine.perturb_cells` (deletions, cell mode),
in a fresh process measured by the harness (wall, CPU, peak RSS of the whole process tree). With
``processes: 2`` that process spawns two gloo processes, as ``torchrun`` would, and the work is
shared by :func:`rosmap_geneformer.distributed.ordered_across_processes`; the threads per
process are ``threads / processes``, so every configuration uses the same cores.

``planning`` is :func:`wall_time.plan`: the hours of a full deletion screen of ROSMAP's
microglia for V1-10M and V2-104M on 1 to 8 GPUs (a model from FLOPs and datasheet peaks), with
this machine's hours from its measured rate (the 512-token rate scaled to 2,048 tokens by FLOPs
per pass). Results go to ``reports/benchmarks/processes.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import harness
import perturbation as exact_benchmark
import wall_time

ROOT = harness.ROOT
V1_10M = exact_benchmark.V1_10M
PLAN = {
    "embed_1": {"task": "embed", "processes": 1, "length": 2048, "cells": 48},
    "embed_2": {"task": "embed", "processes": 2, "length": 2048, "cells": 48},
    "perturb_1": {"task": "perturb", "processes": 1, "length": 512, "cells": 8, "genes": 48},
    "perturb_2": {"task": "perturb", "processes": 2, "length": 512, "cells": 8, "genes": 48},
}


def _job(config: dict[str, Any], rank: int, world_size: int, port: int, queue: Any) -> None:
    """One process of a configuration: build the same model and cells, run, report timing."""
    import numpy as np
    import torch

    from rosmap_geneformer import distributed
    from rosmap_geneformer.analysis.embeddings import cell_embeddings
    from rosmap_geneformer.analysis.perturbation.engine import EngineStats, perturb_cells

    if world_size > 1:
        os.environ.update(distributed.launcher_environment(rank, world_size, port))
    processes = distributed.start(max(1, config["threads"] // world_size))
    encoder = exact_benchmark.v1_10m_encoder(config["seed"])
    rng = np.random.default_rng(config["seed"])
    cells = [
        rng.choice(np.arange(4, V1_10M["vocab_size"]), size=config["length"], replace=False)
        for _ in range(config["cells"])
    ]

    def run(subset: list[Any]) -> int:
        if config["task"] == "embed":
            import datasets

            data = datasets.Dataset.from_dict({"input_ids": [c.tolist() for c in subset]})
            cell_embeddings(
                None,
                data,
                batch_size=8,
                special_tokens=False,
                encoder=encoder,
                processes=processes,
            )
            return len(subset)
        stats = EngineStats()
        positions = [np.arange(config["genes"]) for _ in subset]
        for _ in perturb_cells(
            encoder,
            subset,
            positions,
            perturb_type="delete",
            layer_index=V1_10M["num_hidden_layers"] - 1,
            special_tokens=False,
            progress=False,
            engine_stats=stats,
            processes=processes,
        ):
            pass
        return stats.perturbations

    run(cells[:2])  # warm-up (allocations, kernel selection), every process
    if world_size > 1:
        torch.distributed.barrier()
    start = time.perf_counter()
    units = run(cells)
    seconds = time.perf_counter() - start
    if processes.is_main:
        queue.put({"seconds": seconds, "units": units, "threads": torch.get_num_threads()})
    distributed.end()


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """Time one configuration on ``processes`` processes."""
    import torch.multiprocessing as mp

    from rosmap_geneformer import distributed

    n = config["processes"]
    context = mp.get_context("spawn")
    queue = context.Queue()
    if n == 1:
        _job(config, 0, 1, 0, queue)
    else:
        port = distributed.free_port()
        children = [
            context.Process(target=_job, args=(config, r, n, port, queue)) for r in range(n)
        ]
        for child in children:
            child.start()
        for child in children:
            child.join()
            if child.exitcode != 0:
                msg = f"process exited with {child.exitcode}"
                raise RuntimeError(msg)
    timing = queue.get(timeout=60)
    unit = "cells" if config["task"] == "embed" else "perturbations"
    return {
        **{k: config[k] for k in ("task", "processes", "length", "cells")},
        "threads_per_process": timing["threads"],
        "seconds": round(timing["seconds"], 3),
        unit: timing["units"],
        "per_s": round(timing["units"] / timing["seconds"], 3),
    }


def v1_rate_at_2048(per_s_512: float) -> float:
    """V1-10M deletions per second at 2,048 tokens from the 512-token rate, by FLOPs per pass."""
    return per_s_512 * wall_time.flops_per_pass("V1-10M", 512) / wall_time.flops_per_pass("V1-10M")


def main(argv: list[str] | None = None) -> None:
    """Run every configuration (alternating rounds), write the rates and the planning model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of runs (best kept)")
    parser.add_argument("--output", type=Path, default=ROOT / "reports/benchmarks/processes.json")
    harness.worker_arguments(parser)
    args = parser.parse_args(argv)
    if harness.serve_worker(args, worker):
        return
    plan = {n: {**c, "threads": args.threads, "seed": args.seed} for n, c in PLAN.items()}
    report = harness.start_report(
        "processes",
        torch=True,
        settings={"threads": args.threads, "repeat": args.repeat, "plan": plan},
        model={"shape": "Geneformer-V1-10M", **V1_10M, "weights": "random (seeded)"},
    )
    runs = harness.alternate(
        __file__, plan, repeat=args.repeat, wait_quiet_s=args.wait_quiet, show="per_s"
    )
    results = {n: harness.best_of(r, "per_s") for n, r in runs.items()}
    for task in ("embed", "perturb"):
        one, two = results[f"{task}_1"]["per_s"], results[f"{task}_2"]["per_s"]
        results[f"{task}_speedup_2_over_1"] = harness.ratio(two, one)
    report["results"] = results
    report["planning"] = wall_time.plan(cpu_rate_v1=v1_rate_at_2048(results["perturb_1"]["per_s"]))
    harness.finish_report(report, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
