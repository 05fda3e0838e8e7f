"""Embedding and perturbation throughput on 1 and 2 processes (not a test):
``python benchmarks/processes.py``.

On a Geneformer-V1-10M-shaped encoder (random seeded weights), each configuration runs the
stages' own code, :func:`rosmap_geneformer.analysis.embeddings.cell_embeddings` and
:func:`rosmap_geneformer.analysis.perturbation.engine.perturb_cells` (deletions, cell mode),
in a fresh process measured by the harness (wall, CPU, peak RSS of the whole process tree). With
``processes: 2`` that process spawns two gloo processes, as ``torchrun`` would, and the work is
shared by :func:`rosmap_geneformer.distributed.ordered_across_processes`; the threads per
process are ``threads / processes``, so every configuration uses the same cores.

``planning`` turns the measured deletion rate into the wall time of a full screen (cells x genes
per cell deletions) and scales it to a larger model by its forward cost per token (parameters
outside the embeddings, plus attention). It is a model, not a measurement: on GPUs, measure the
rate on one GPU (``--rate``) and the same arithmetic gives N GPUs. Results go to
``reports/benchmarks/processes.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import harness
import perturbation as exact_benchmark

ROOT = harness.ROOT
V1_10M = exact_benchmark.V1_10M
# Geneformer V2-104M (Chen et al. 2024): 12 layers, hidden 768, 4,096 genes per cell.
V2_104M = {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 3072, "length": 4096}
PLAN = {
    "embed_1": {"task": "embed", "processes": 1, "length": 2048, "cells": 48},
    "embed_2": {"task": "embed", "processes": 2, "length": 2048, "cells": 48},
    "perturb_1": {"task": "perturb", "processes": 1, "length": 512, "cells": 8, "genes": 48},
    "perturb_2": {"task": "perturb", "processes": 2, "length": 512, "cells": 8, "genes": 48},
}
# ROSMAP microglia: about 100k nuclei; a screen of 1,000 cells with every gene deleted.
SCREEN = {"cells": 1000, "genes_per_cell_v1": 2048, "genes_per_cell_v2": 4096}


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


def forward_cost(layers: int, hidden: int, intermediate: int, length: int) -> float:
    """Multiply-adds per cell of one forward pass: the dense layers (4 h^2 + 2 h i per token)
    plus attention (2 L h per token), times L tokens and the layers."""
    per_token = 4 * hidden**2 + 2 * hidden * intermediate + 2 * length * hidden
    return float(layers * length * per_token)


def planning(per_s_512: float | None, *, rate_2048: float | None = None) -> dict[str, Any]:
    """Hours of a full deletion screen of ROSMAP microglia on this machine's processes.

    The V1-10M rate at 2,048 tokens is scaled from the 512-token rate by the forward cost
    unless measured; V2-104M (4,096 tokens) by its forward cost relative to V1-10M's.
    """
    if not per_s_512:
        return {}
    v1 = (V1_10M["num_hidden_layers"], V1_10M["hidden_size"], V1_10M["intermediate_size"])
    cost = {L: forward_cost(*v1, L) for L in (512, 2048)}
    v1_rate = rate_2048 or per_s_512 * cost[512] / cost[2048]
    v2_cost = forward_cost(
        V2_104M["num_hidden_layers"],
        V2_104M["hidden_size"],
        V2_104M["intermediate_size"],
        V2_104M["length"],
    )
    v2_rate = v1_rate * cost[2048] / v2_cost
    v1_pert = SCREEN["cells"] * SCREEN["genes_per_cell_v1"]
    v2_pert = SCREEN["cells"] * SCREEN["genes_per_cell_v2"]
    return {
        "screen": SCREEN,
        "model": "hours = cells x genes per cell / (rate x processes); rates scaled by "
        "multiply-adds per forward pass",
        "v1_10m_2048_per_s": round(v1_rate, 3),
        "v2_104m_4096_per_s": round(v2_rate, 4),
        "v1_10m_hours": round(v1_pert / v1_rate / 3600, 1),
        "v2_104m_hours": round(v2_pert / v2_rate / 3600, 1),
        "v2_over_v1_cost_per_deletion": round(v2_cost / cost[2048], 1),
    }


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
    report["planning"] = planning(results["perturb_1"]["per_s"])
    harness.finish_report(report, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
