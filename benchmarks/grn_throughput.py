"""Throughput of the grn stage's model methods (not a test): ``python benchmarks/grn_throughput.py``.

On a Geneformer-V1-10M-shaped encoder (random seeded weights; the speed does not depend on the
weights), cells of ``length`` random genes each hold the same ``regulators`` regulator tokens at
random positions. Each configuration runs the stage's own code in a fresh process, measured by
the harness (wall, CPU time, peak RSS of the process tree):

- ``attention``: :func:`rosmap_geneformer.analysis.grn.attention.attention_edges`, both recipes
  (one forward pass per cell, then every layer's attention rebuilt from the captured queries and
  keys; the per-layer recipe ranks one layer's full score matrix);
- ``deletion``: :func:`rosmap_geneformer.analysis.grn.inference.infer_grn` with the
  position-matched control (two deletions per regulator and cell, in gene mode).

The rates give the time of a real run: attention costs per cell (whatever the number of
regulators in it), deletion per regulator and cell. ``planning`` applies them to ROSMAP's
microglia at the shipped ``grn.max_cells`` (100 cells per regulator) for a list of regulator
counts. Results go to ``reports/benchmarks/grn_throughput.json``.
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
PLAN = {
    "attention_512": {"method": "attention", "length": 512, "cells": 16},
    "deletion_512": {"method": "deletion", "length": 512, "cells": 16},
    "attention_2048": {"method": "attention", "length": 2048, "cells": 4},
    "deletion_2048": {"method": "deletion", "length": 2048, "cells": 4},
}
PLANNING_REGULATORS = (10, 100, 1639)  # a panel, a large screen, every Lambert TF


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """Time one method on ``cells`` synthetic cells."""
    import numpy as np
    import pandas as pd
    import torch

    from rosmap_geneformer.analysis.grn.attention import AttentionStats, attention_edges
    from rosmap_geneformer.analysis.grn.inference import infer_grn

    torch.set_num_threads(config["threads"])
    encoder = exact_benchmark.v1_10m_encoder(config["seed"])
    rng = np.random.default_rng(config["seed"])
    regulators = np.arange(4, 4 + config["regulators"])
    pool = np.arange(4 + config["regulators"], V1_10M["vocab_size"])
    cells = []
    for _ in range(config["cells"]):
        ids = rng.choice(pool, size=config["length"], replace=False)
        ids[rng.choice(config["length"], size=regulators.size, replace=False)] = regulators
        cells.append(ids)

    def run(batch: list[Any]) -> None:
        members = np.arange(len(batch))
        if config["method"] == "attention":
            edges = pd.DataFrame(
                [(int(r), int(t)) for r in regulators for t in batch[0] if t != r],
                columns=["regulator", "target"],
            )
            attention_edges(
                encoder,
                batch,
                {int(r): members for r in regulators},
                edges,
                special_tokens=False,
                max_tokens=config["max_tokens"],
                progress=False,
                stats=AttentionStats(),
            )
        else:
            infer_grn(
                encoder,
                batch,
                regulators.tolist(),
                layer_index=V1_10M["num_hidden_layers"] - 1,
                special_tokens=False,
                max_cells=None,
                min_cells=1,
                control="neighbor",
                max_tokens=config["max_tokens"],
                progress=False,
            )

    run(cells[:1])  # warm-up outside the timing (allocations, kernel selection)
    start, cpu0 = time.perf_counter(), time.process_time()
    run(cells)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    n_pairs = len(cells) * regulators.size
    return {
        "method": config["method"],
        "length": config["length"],
        "cells": len(cells),
        "regulators_per_cell": int(regulators.size),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "cells_per_s": round(len(cells) / seconds, 4),
        "regulator_cells_per_s": round(n_pairs / seconds, 4),
        "threads": config["threads"],
        "max_tokens": config["max_tokens"],
    }


def planning(results: dict[str, Any], *, max_cells: int = 100) -> dict[str, Any]:
    """Hours for ``max_cells`` cells per regulator, at the measured rates.

    Attention reads each cell once, whatever its regulators: at most ``regulators x max_cells``
    cells (fewer where regulators share cells). Deletion costs per regulator and cell.
    """
    out: dict[str, Any] = {"max_cells": max_cells, "assumes": "cells of 2,048 genes (V1 input)"}
    attention = results.get("attention_2048", {}).get("cells_per_s")
    deletion = results.get("deletion_2048", {}).get("regulator_cells_per_s")
    for n in PLANNING_REGULATORS:
        pairs = n * max_cells
        out[f"{n}_regulators"] = {
            "attention_hours_at_most": round(pairs / attention / 3600, 2) if attention else None,
            "deletion_hours": round(pairs / deletion / 3600, 2) if deletion else None,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """Run every configuration (alternating rounds), write the rates and the planning table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16_384)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--regulators", type=int, default=4, help="regulators in every cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of runs (best kept)")
    parser.add_argument("--quick", action="store_true", help="512 tokens, 4 cells only")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "reports/benchmarks/grn_throughput.json"
    )
    harness.worker_arguments(parser)
    args = parser.parse_args(argv)
    if harness.serve_worker(args, worker):
        return
    common = {
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "seed": args.seed,
        "regulators": args.regulators,
    }
    plan = {name: {**spec, **common} for name, spec in PLAN.items()}
    if args.quick:
        plan = {n: c | {"cells": 4} for n, c in plan.items() if n.endswith("512")}
    report = harness.start_report(
        "grn_throughput",
        torch=True,
        settings={**common, "repeat": args.repeat, "quick": args.quick, "plan": plan},
        model={"shape": "Geneformer-V1-10M", **V1_10M, "weights": "random (seeded)"},
    )
    runs = harness.alternate(
        __file__, plan, repeat=args.repeat, wait_quiet_s=args.wait_quiet, show="cells_per_s"
    )
    results = {n: harness.best_of(r, "cells_per_s") for n, r in runs.items()}
    report["results"] = results
    report["planning"] = planning(results)
    harness.finish_report(report, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
