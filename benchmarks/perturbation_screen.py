"""The deletion screen against the exact run (not a test): ``python benchmarks/perturbation_screen.py``.

For each model, the same cells and genes go through the perturb stage's own code
(``run_state_perturbation``) once exactly (every deletion a forward pass) and once per
``confirm`` fraction with ``perturb.screen.method: estimate`` (a grid of exact deletions per cell
plus one backward pass per state, :mod:`rosmap_geneformer.analysis.perturbation.estimate`; then
the genes at both ends of the estimated ranking, and those with an estimated FDR below
``--confirm-fdr``, run exactly), each timed in CPU-seconds in the same process. Each screen's
table is scored against the exact one: recall of the exact top 1% and top 50 genes (by the net
shift, the stage's ranking), Spearman of the per-gene net shift, and the FDR calls (BH < 0.05 on
the net shift).

Models: ``demo_<cell type>`` (``models/finetuned/disease`` and its AD cells of Mic, Ast and Exc,
state centroids of that type as the perturb stage; needs the demo), ``v1_10m`` (Geneformer-V1-10M's shape, random seeded weights,
random cells) and ``v2_layout`` (V2's layout: ``<cls>``/``<eos>``, 4,096 positions, the
``<cls>`` vector read; V1-10M-sized layers: an exact all-genes run of V2-104M is out of reach on
two cores); the synthetic cells are 24 of 256 genes drawn from a pool of 400, so that every gene
is deleted in several cells and the rank-sum tests have power. Random weights have no order
along the position, which the estimate interpolates along: they are its hard case. Speed at Geneformer's length: one cell of 2,048 tokens on the
V1-10M shape, the estimate measured whole and the exact rate measured on ``--sample`` deletions.

Geneformer's own ``InSilicoPerturber`` cannot be installed here (not on PyPI, no hub access):
its speed is *quoted* from issue #17 (1.40x slower than this engine per CPU-second, measured side
by side on a 2-core host in the filer's session), and the ratio is applied to this run's exact
rate, labelled as derived. Results go to ``reports/benchmarks/perturbation_screen.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import harness
import perturbation as exact_benchmark

ROOT = harness.ROOT
# Issue #17's side-by-side figures, and the V1-10M shape, as benchmarks/perturbation.py has them.
GENEFORMER_QUOTED = exact_benchmark.GENEFORMER_QUOTED["issue_17"]
ENGINE_OVER_GENEFORMER = GENEFORMER_QUOTED["figures"]["engine_over_geneformer"]["delete"]
V1_10M = exact_benchmark.V1_10M
CONFIRM = (0.01, 0.02, 0.05, 0.1)


def _synthetic(config: dict[str, Any], *, special: bool) -> dict[str, Any]:
    """Random rank-ordered cells over a pool of genes; goal cells rank one gene set high."""
    import numpy as np

    from rosmap_geneformer.analysis.embeddings import cell_embeddings

    rng = np.random.default_rng(config["seed"])
    pool = rng.choice(np.arange(4, V1_10M["vocab_size"]), size=config["pool"], replace=False)
    enriched = pool[: config["pool"] // 20]

    def cell(goal: bool) -> np.ndarray:
        weights = np.ones(pool.size)
        if goal:
            weights[: enriched.size] = 20.0
        genes = rng.choice(pool, size=config["length"], replace=False, p=weights / weights.sum())
        return np.concatenate([[2], genes, [3]]) if special else genes

    encoder = exact_benchmark.v1_10m_encoder(config["seed"], positions=4096 if special else 2048)
    import datasets

    centroids = {}
    for state, goal in (("control", True), ("AD", False)):
        ids = [cell(goal).tolist() for _ in range(config["state_cells"])]
        emb = cell_embeddings(
            None,
            datasets.Dataset.from_dict({"input_ids": ids}),
            emb_layer=0,
            special_tokens=special,
            encoder=encoder,
        )
        centroids[state] = emb.astype(np.float64).mean(axis=0)
    cells = [cell(False) for _ in range(config["cells"])]
    layer_index = V1_10M["num_hidden_layers"]
    return {"encoder": encoder, "cells": cells, "centroids": centroids, "layer": layer_index}


def _demo(config: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from rosmap_geneformer import io
    from rosmap_geneformer.analysis.embeddings import cell_embeddings, load_encoder

    dataset = io.read_dataset(ROOT / "data/processed/tokenized/train.dataset")
    encoder, bert = load_encoder(ROOT / "models/finetuned/disease", device="cpu")
    types = np.asarray(dataset["cell_type"], dtype=object)
    states = np.asarray(dataset["ad_status"], dtype=object)
    centroids = {}
    for state in ("control", "AD"):
        rows = np.flatnonzero((types == config["cell_type"]) & (states == state))[:1000]
        emb = cell_embeddings(None, dataset.select(rows.tolist()), emb_layer=0, encoder=encoder)
        centroids[state] = emb.astype(np.float64).mean(axis=0)
    rows = np.flatnonzero((types == config["cell_type"]) & (states == "AD"))[: config["cells"]]
    cells = [np.asarray(c) for c in dataset.select(rows.tolist())["input_ids"]]
    return {
        "encoder": encoder,
        "cells": cells,
        "centroids": centroids,
        "layer": bert.num_hidden_layers,
    }


def _scores(exact: Any, table: Any, *, fdr: float = 0.05) -> dict[str, Any]:
    """Agreement of a per-gene table with the exact one (both ranked by the net shift)."""
    import math

    import numpy as np
    from scipy.stats import spearmanr

    from rosmap_geneformer.analysis.perturbation.statistics import NET

    key = f"{NET}_mean_shift"
    n = len(exact)
    top1 = max(1, math.ceil(n / 100))
    top50 = min(50, n // 2)
    exact_order, order = list(exact.index), list(table.index)
    other = table.loc[exact.index]
    exact_calls = exact[f"{NET}_fdr"] < fdr
    calls = other[f"{NET}_fdr"] < fdr
    return {
        "genes": n,
        "top_1pct_genes": top1,
        "recall_top_1pct": len(set(exact_order[:top1]) & set(order[:top1])) / top1,
        "recall_top_50": len(set(exact_order[:top50]) & set(order[:top50])) / top50,
        "spearman_net_shift": float(spearmanr(exact[key], other[key]).statistic),
        "fdr_calls_exact": int(exact_calls.sum()),
        "fdr_calls_screen": int(calls.sum()),
        "fdr_calls_both": int((exact_calls & calls).sum()),
        "fdr_calls_agree_fraction": float(np.mean(exact_calls.to_numpy() == calls.to_numpy())),
    }


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """One model: the stage's exact run and its screen at each ``confirm``, scored and timed."""
    import numpy as np
    import torch

    from rosmap_geneformer.analysis.perturbation import estimate, screen

    torch.set_num_threads(config["threads"])
    if config["model"] == "speed_2048":
        return speed_worker(config)
    special = config["model"] == "v2_layout"
    setup = _demo(config) if config["model"] == "demo" else _synthetic(config, special=special)
    encoder, cells, centroids = setup["encoder"], setup["cells"], setup["centroids"]
    genes = screen.genes_to_perturb(cells, min_cells=config["min_cells"], special_tokens=special)

    def run(settings: Any) -> tuple[Any, float]:
        cpu0 = time.process_time()
        result = screen.run_state_perturbation(
            encoder,
            cells,
            genes,
            centroids,
            goal_state="control",
            start_state="AD",
            rank_by="net",
            perturb_type="delete",
            layer_index=setup["layer"],
            special_tokens=special,
            progress=False,
            screen=settings,
        )
        return result, time.process_time() - cpu0

    exact, exact_cpu = run(estimate.ScreenSettings())
    out: dict[str, Any] = {
        "model": config["model"],
        "cells": len(cells),
        "mean_length": float(np.mean([len(c) for c in cells])),
        "perturbations": exact.engine.perturbations,
        "exact": {
            "cpu_seconds": round(exact_cpu, 2),
            "perturbations_per_cpu_s": round(exact.engine.perturbations / exact_cpu, 2),
        },
        "screen": {},
    }
    quoted = ENGINE_OVER_GENEFORMER
    for fraction in CONFIRM:
        settings = estimate.ScreenSettings(
            method="estimate",
            grid=config["grid"],
            confirm=fraction,
            confirm_fdr=config["confirm_fdr"],
        )
        result, cpu = run(settings)
        out["screen"][str(fraction)] = {
            "cpu_seconds": round(cpu, 2),
            "fewer_cpu_seconds_than_exact": round(exact_cpu / cpu, 1),
            "fewer_cpu_seconds_than_geneformer_derived": round(exact_cpu * quoted / cpu, 1),
            **result.screen,
            **_scores(exact.table, result.table),
        }
    return out


def speed_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One 2,048-token cell, V1-10M shape: exact CPU-seconds per deletion (on a sample) and the
    whole estimate."""
    import numpy as np

    from rosmap_geneformer.analysis.perturbation import estimate
    from rosmap_geneformer.analysis.perturbation.engine import EngineStats, perturb_cells

    encoder = exact_benchmark.v1_10m_encoder(config["seed"])
    rng = np.random.default_rng(config["seed"])
    ids = rng.choice(np.arange(4, V1_10M["vocab_size"]), size=2048, replace=False)
    centroids = {s: rng.normal(size=V1_10M["hidden_size"]) for s in ("control", "AD")}
    common = {
        "layer_index": V1_10M["num_hidden_layers"] - 1,
        "special_tokens": False,
        "progress": False,
    }
    sample = np.linspace(0, 2047, config["sample"]).astype(np.int64)
    list(perturb_cells(encoder, [ids], [sample[:4]], perturb_type="delete", **common))  # warm-up
    engine = EngineStats()
    cpu0 = time.process_time()
    list(
        perturb_cells(
            encoder, [ids], [sample], perturb_type="delete", engine_stats=engine, **common
        )
    )
    per_deletion = (time.process_time() - cpu0) / engine.perturbations
    stats = estimate.EstimateStats()
    cpu0 = time.process_time()
    list(
        estimate.estimate_deletions(
            encoder, [ids], [np.arange(2048)], centroids, grid=config["grid"], stats=stats, **common
        )
    )
    estimate_cpu = time.process_time() - cpu0
    exact_cell = per_deletion * 2048
    out = {
        "length": 2048,
        "exact_cpu_s_per_deletion": round(per_deletion, 4),
        "exact_sampled_deletions": engine.perturbations,
        "exact_cpu_s_per_cell_extrapolated": round(exact_cell, 1),
        "geneformer_cpu_s_per_cell_derived": round(exact_cell * ENGINE_OVER_GENEFORMER, 1),
        "estimate_cpu_s_per_cell": round(estimate_cpu, 2),
        "gradient_cpu_s": round(stats.gradient_seconds, 2),
        "by_confirm": {},
    }
    for fraction in CONFIRM:
        confirmed = 2 * int(np.ceil(fraction * 2048))
        cpu = estimate_cpu + confirmed * per_deletion
        out["by_confirm"][str(fraction)] = {
            "cpu_s_per_cell": round(cpu, 1),
            "fewer_than_exact": round(exact_cell / cpu, 1),
            "fewer_than_geneformer_derived": round(
                out["geneformer_cpu_s_per_cell_derived"] / cpu, 1
            ),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """Run every model in its own process and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--confirm-fdr", type=float, default=0.25)
    parser.add_argument("--cells", type=int, default=24, help="cells per synthetic model")
    parser.add_argument("--length", type=int, default=256, help="genes per synthetic cell")
    parser.add_argument("--sample", type=int, default=128, help="exact deletions at 2,048")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "reports/benchmarks/perturbation_screen.json"
    )
    harness.worker_arguments(parser)
    args = parser.parse_args(argv)
    if harness.serve_worker(args, worker):
        return
    common = {
        "threads": args.threads,
        "seed": args.seed,
        "grid": args.grid,
        "confirm_fdr": args.confirm_fdr,
    }
    synthetic = {
        "cells": args.cells,
        "length": args.length,
        "pool": 1000,
        "state_cells": 20,
        "min_cells": 3,
    }
    plan = {
        **{
            f"demo_{cell_type}": {
                "model": "demo",
                "cell_type": cell_type,
                "cells": 50,
                "min_cells": 10,
            }
            for cell_type in ("Mic", "Ast", "Exc")
        },
        "v1_10m": {"model": "v1_10m", **synthetic},
        "v2_layout": {"model": "v2_layout", **synthetic},
        "speed_2048": {"model": "speed_2048", "sample": args.sample},
    }
    if not (ROOT / "models/finetuned/disease").is_dir():
        plan = {k: v for k, v in plan.items() if v["model"] != "demo"}
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only}
    report = harness.start_report(
        "perturbation_screen",
        torch=True,
        settings={**common, "plan": plan},
        geneformer=GENEFORMER_QUOTED,
    )
    results = {}
    for name, config in plan.items():
        results[name] = harness.run_worker(
            __file__, {**config, **common}, wait_quiet_s=args.wait_quiet
        )
        print(
            json.dumps({name: {k: v for k, v in results[name].items() if k != "process"}}, indent=1)
        )
    report["results"] = results
    harness.finish_report(report, args.output)


if __name__ == "__main__":
    main()
