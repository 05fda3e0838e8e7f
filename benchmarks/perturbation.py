"""In silico deletion throughput benchmark (not a test): ``python benchmarks/perturbation.py``.

Cell mode (``cos(perturbed, original)`` of mean-pooled cell embeddings, Geneformer's default
``emb_layer=-1``), deletion of every gene of a cell, on the CPU, with a model of
Geneformer-V1-10M's shape (6 layers, hidden 256, 4 heads, intermediate 512, 2,048 positions,
vocabulary 25,426, ReLU; random weights, seeded) and random cells of 512 and 2,048 tokens.

Methods, each run in its own interpreter through :mod:`harness` (quiet-machine wait, load
recorded, process-tree peak RSS), all of them alternating within each of ``--repeat`` rounds:

- ``batched`` (ours, the project's ``perturb_cells``): all deletions of a cell in forward passes
  of ``--max-tokens`` tokens, no padding, only the layers up to the one read;
- ``naive``: Geneformer's way, re-implemented here: one full forward pass of the whole encoder
  per deleted gene with ``output_hidden_states``, 100 to a batch, then
  ``hidden_states[n_layers + emb_layer]`` mean-pooled;
- ``batched_bf16``: ours with ``precision="bfloat16"`` (autocast, float32 accumulation); its
  agreement with the float32 naive shifts is reported (largest difference, Spearman).

Speed-ups are only computed between methods measured in this run (ours over naive).
``float32_ceiling``: the FLOPs of one deletion's forward pass at this machine's measured float32
matrix-product rates (the model's fastest projection shape, and a large square product), as
perturbations/s. Geneformer's own ``InSilicoPerturber`` cannot be installed here (not on PyPI, no
hub access), so it is not run: its figures from issues #8 and #17 (the latter measured beside
this engine, same model and cells, on the filer's host) are quoted, labelled with where they
come from, and divided into nothing. ``naive`` is the project's own re-implementation of
Geneformer's way, not Geneformer. Also measured when the demo has been run: the
demo's fine-tuned model (``models/finetuned/disease``) on its tokenized cells, float32 and
bfloat16, with their agreement. ``--quick``: the 512-token methods on 32 deletions only (a smoke
run). Results go to ``reports/benchmarks/perturbation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import harness

ROOT = harness.ROOT
GENEFORMER_QUOTED = {
    "issue_8": harness.quoted(
        {
            "setup": "Geneformer InSilicoPerturber, delete, emb_mode cell, V1-10M shape, "
            "forward_batch_size 100, 2-core machine",
            "perturbations_per_s": {"512": 17.5, "2048": 3.1},
            "peak_rss_gib": 3.4,
        },
        source="project issue #8 (measured before this benchmark; CPU, sort dispatch and load "
        "not recorded)",
    ),
    "issue_17": harness.quoted(
        {
            "setup": "Geneformer InSilicoPerturber beside this project's engine, same "
            "V1-10M-shaped model and cells, same session; delete, cell mode",
            "perturbations_per_cpu_s": {"geneformer": 16.5, "engine": 23.0},
            "engine_over_geneformer": {"delete": 1.40, "overexpress": 1.39, "cell_and_gene": 1.57},
            "max_shift_difference": 3e-7,
        },
        source="project issue #17 (the filer's session, a 2-core host; Geneformer is not "
        "installable on this machine: not on PyPI, no hub access)",
    ),
}
V1_10M = {
    "vocab_size": 25_426,
    "max_position_embeddings": 2048,
    "num_hidden_layers": 6,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "dropout": 0.02,
    "attention_dropout": 0.02,
}
F32, BF16 = (
    {"method": "batched", "precision": "float32"},
    {"method": "batched", "precision": "bfloat16"},
)
PLAN = {  # ``check``: deletions also run the naive way, to compare the shifts
    "batched_512": {**F32, "length": 512, "perturbations": 511, "check": 100},
    "naive_512": {"method": "naive", "length": 512, "perturbations": 200},
    "batched_2048": {**F32, "length": 2048, "perturbations": 200, "check": 20},
    "naive_2048": {"method": "naive", "length": 2048, "perturbations": 100},
    "batched_bf16_512": {**BF16, "length": 512, "perturbations": 511, "check": 100},
    "batched_bf16_2048": {**BF16, "length": 2048, "perturbations": 200, "check": 20},
}


def _library() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """The library modules this benchmark uses (the one place to update if they move)."""
    from rosmap_geneformer import io
    from rosmap_geneformer.analysis import embeddings
    from rosmap_geneformer.analysis.perturbation import engine
    from rosmap_geneformer.geneformer import model

    return io, embeddings, engine, model


# ------------------------------------------------------------------------------------------
# Worker (one configuration per process)


def v1_10m_encoder(seed: int, *, positions: int = V1_10M["max_position_embeddings"]) -> Any:
    """A randomly initialised (seeded) V1-10M-shaped encoder with SDPA attention (``positions``:
    4,096 for V2's layout)."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    config = _library()[3].geneformer_bert_config(
        **{**V1_10M, "max_position_embeddings": positions}
    )
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False).eval()


def naive_shifts(
    encoder: Any, ids: Any, positions: Any, *, layer_index: int, batch_size: int = 100
) -> Any:
    """Geneformer's way: one full forward per deleted gene, ``batch_size`` to a batch."""
    import numpy as np
    import torch

    def pooled(batch: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            out = encoder(
                input_ids=torch.from_numpy(batch.astype(np.int64)),
                attention_mask=torch.ones(batch.shape, dtype=torch.long),
                output_hidden_states=True,
            )
        return out.hidden_states[layer_index].mean(dim=1)

    original = pooled(ids[None])[0]
    cosines = []
    for start in range(0, len(positions), batch_size):
        batch = np.stack([np.delete(ids, p) for p in positions[start : start + batch_size]])
        emb = pooled(batch)
        cosines.append(torch.nn.functional.cosine_similarity(emb.double(), original.double()[None]))
    return torch.cat(cosines).numpy()


def batched_shifts(
    encoder: Any, ids: Any, positions: Any, *, layer_index: int, max_tokens: int, precision: str
) -> Any:
    """Ours: the project's engine on one cell."""
    results = _library()[2].perturb_cells(
        encoder,
        [ids],
        [positions],
        perturb_type="delete",
        layer_index=layer_index,
        special_tokens=False,
        max_tokens=max_tokens,
        precision=precision,
        progress=False,
    )
    return next(iter(results)).cell_cosines


def flops_per_deletion(length: int, layers: int) -> float:
    """FLOPs of one deletion's forward pass (``length - 1`` tokens through ``layers`` V1-10M
    layers): the four attention projections, the feed-forward pair and the two attention
    products; layer norms, softmax and activations left out."""
    d, ff, n = V1_10M["hidden_size"], V1_10M["intermediate_size"], length - 1
    return float(layers * n * (2 * (4 * d * d + 2 * d * ff) + 2 * 2 * n * d))


def gemm_worker(config: dict[str, Any]) -> dict[str, Any]:
    """This machine's float32 matrix-product rates (GFLOP/s) at the model's projection shapes
    (16,384 tokens; hidden 256, intermediate 512) and on a large square product (the peak)."""
    import torch

    shapes = {
        "attention_projection_256x256": (16_384, 256, 256),
        "ffn_up_256x512": (16_384, 256, 512),
        "ffn_down_512x256": (16_384, 512, 256),
        "square_2048": (2048, 2048, 2048),
    }
    out: dict[str, Any] = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        repeats, start = 20, time.perf_counter()
        for _ in range(repeats):
            a @ b
        out[name] = round(2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9, 1)
    out["best_model_shape"] = max(v for name, v in out.items() if name != "square_2048")
    return out


def demo_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The demo's fine-tuned model on its Mic cells: float32 and bfloat16 rates, agreement."""
    import numpy as np
    from scipy.stats import spearmanr

    io, embeddings, engine, _ = _library()
    model_dir = ROOT / "models" / "finetuned" / "disease"
    dataset = io.read_dataset(ROOT / "data" / "processed" / "tokenized" / "train.dataset")
    encoder, bert = embeddings.load_encoder(model_dir, device="cpu")
    rows = [i for i, t in enumerate(dataset["cell_type"]) if t == "Mic"][: config["cells"]]
    cells = [np.asarray(x) for x in dataset.select(rows)["input_ids"]]
    out: dict[str, Any] = {"model": str(model_dir.relative_to(ROOT)), "cells": len(cells)}
    for emb_layer in (0, -1):
        layer_index = embeddings.hidden_layer_index(bert.num_hidden_layers, emb_layer)
        shifts = {}
        for precision, suffix in (("float32", ""), ("bfloat16", "_bf16")):
            stats = engine.EngineStats()
            results = engine.perturb_cells(
                encoder,
                cells,
                [np.arange(len(c)) for c in cells],
                perturb_type="delete",
                layer_index=layer_index,
                special_tokens=False,
                max_tokens=config["max_tokens"],
                precision=precision,
                progress=False,
                engine_stats=stats,
            )
            by_cell = {r.cell: 1.0 - r.cell_cosines for r in results}
            shifts[precision] = np.concatenate([by_cell[i] for i in sorted(by_cell)])
            out[f"emb_layer_{emb_layer}{suffix}"] = {
                "perturbations": stats.perturbations,
                "seconds": round(stats.seconds, 3),
                "perturbations_per_s": round(stats.rate, 2),
                "mean_length": float(np.mean([len(c) for c in cells])),
            }
        exact, fast = shifts["float32"], shifts["bfloat16"]
        top = max(1, exact.size // 100)
        out[f"emb_layer_{emb_layer}_bf16"] |= {
            "shift_median_float32": float(np.median(exact)),
            "max_abs_shift_difference": float(np.max(np.abs(fast - exact))),
            "spearman_vs_float32": float(spearmanr(fast, exact).statistic),
            "top_1pct_overlap": len(set(np.argsort(-exact)[:top]) & set(np.argsort(-fast)[:top]))
            / top,
        }
    out["architecture"] = {
        k: getattr(bert, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size")
    }
    return out


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration: ``method`` batched or naive (timed), gemm or demo."""
    import numpy as np
    import torch

    torch.set_num_threads(config["threads"])
    if config["method"] in ("gemm", "demo"):
        return (gemm_worker if config["method"] == "gemm" else demo_worker)(config)
    encoder = v1_10m_encoder(config["seed"])
    layer_index = V1_10M["num_hidden_layers"] - 1  # emb_layer=-1
    rng = np.random.default_rng(config["seed"])
    ids = rng.choice(np.arange(2, V1_10M["vocab_size"]), size=config["length"], replace=False)
    positions = np.arange(min(config["perturbations"], config["length"]))
    batched = config["method"] == "batched"

    def shifts(at: Any, batch_size: int = 100) -> Any:
        if batched:
            precision, max_tokens = config["precision"], config["max_tokens"]
            return batched_shifts(
                encoder,
                ids,
                at,
                layer_index=layer_index,
                max_tokens=max_tokens,
                precision=precision,
            )
        return naive_shifts(encoder, ids, at, layer_index=layer_index, batch_size=batch_size)

    # Warm-up outside the timing (first-call allocations, kernel selection).
    warm = positions[: max(2, min(8, len(positions)))]
    shifts(warm, batch_size=len(warm))
    start, cpu0 = time.perf_counter(), time.process_time()
    result = shifts(positions)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    agreement: dict[str, Any] = {}
    check = positions[: config.get("check", 0)]
    if batched and len(check):
        from scipy.stats import spearmanr

        reference = naive_shifts(encoder, ids, check, layer_index=layer_index)
        ours = result[: len(check)]
        agreement = {
            "checked_perturbations": len(check),
            "max_abs_cosine_difference_vs_naive": float(np.max(np.abs(ours - reference))),
            "naive_shift_min": float(np.min(1 - reference)),
            "naive_shift_max": float(np.max(1 - reference)),
            "spearman_vs_naive": float(spearmanr(ours, reference).statistic),
        }
    return {
        "method": config["method"],
        "length": config["length"],
        "perturbations": len(positions),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "perturbations_per_s": round(len(positions) / seconds, 3),
        # Load-robust estimate of the idle-machine rate: perturbations per CPU-second times
        # the threads (conservative: busy-waiting threads also burn CPU time).
        "cpu_normalised_per_s": round(len(positions) / cpu * config["threads"], 3),
        "max_tokens": config["max_tokens"] if batched else None,
        "precision": config["precision"] if batched else "float32",
        **agreement,
        "threads": config["threads"],
    }


# ------------------------------------------------------------------------------------------
# Driver


def main(argv: list[str] | None = None) -> None:
    """Run every method (alternating), the matrix-product rates and the demo model; write."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16_384)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cells", type=int, default=8, help="demo cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of runs (best kept)")
    parser.add_argument("--quick", action="store_true", help="512 tokens, 32 deletions only")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "reports/benchmarks/perturbation.json"
    )
    harness.worker_arguments(parser)
    args = parser.parse_args(argv)
    if harness.serve_worker(args, worker):
        return

    common = {"max_tokens": args.max_tokens, "threads": args.threads, "seed": args.seed}
    plan = {name: {**spec, **common} for name, spec in PLAN.items()}
    if args.quick:
        plan = {n: c | {"perturbations": 32, "check": 16} for n, c in plan.items() if "512" in n}
    report = harness.start_report(
        "perturbation",
        torch=True,
        note="all methods measured in this run, alternating; wall rates depend on the load "
        "recorded beside each (process.busy_cpus_before); cpu_normalised rates estimate an "
        "idle machine",
        settings={**common, "repeat": args.repeat, "quick": args.quick, "plan": plan},
        model={"shape": "Geneformer-V1-10M", **V1_10M, "weights": "random (seeded)"},
        emb_mode="cell",
        emb_layer=-1,
        geneformer=GENEFORMER_QUOTED,
    )
    runs = harness.alternate(
        __file__, plan, repeat=args.repeat, wait_quiet_s=args.wait_quiet, show="perturbations_per_s"
    )
    also = ["cpu_normalised_per_s"]
    results = {n: harness.best_of(r, "perturbations_per_s", also=also) for n, r in runs.items()}
    if not args.quick and (ROOT / "models" / "finetuned" / "disease").is_dir():
        demo = {"method": "demo", "cells": args.cells, **common}
        results["demo_model"] = harness.run_worker(__file__, demo, wait_quiet_s=args.wait_quiet)
    speedup = {}
    for name in ("512", "2048", "bf16_512", "bf16_2048"):
        length = name.rsplit("_", 1)[-1]
        if f"batched_{name}" in results and f"naive_{length}" in results:
            ours, naive = results[f"batched_{name}"], results[f"naive_{length}"]
            speedup[name] = {
                "over_naive_wall": harness.ratio(
                    ours["perturbations_per_s"], naive["perturbations_per_s"]
                ),
                "over_naive_cpu_normalised": harness.ratio(
                    ours["cpu_normalised_per_s"], naive["cpu_normalised_per_s"]
                ),
            }
    # What an exact float32 method could reach at best: every FLOP at the measured rate of the
    # model's fastest projection shape, or even at the CPU's large-matrix peak.
    gemm = harness.run_worker(__file__, {"method": "gemm", **common}, wait_quiet_s=args.wait_quiet)
    ceiling: dict[str, Any] = {"float32_gflop_per_s": gemm}
    layers = V1_10M["num_hidden_layers"] - 1  # emb_layer -1: the last layer is not needed
    for length in ("512", "2048"):
        if f"batched_{length}" not in results:
            continue
        flops = flops_per_deletion(int(length), layers)
        ours = results[f"batched_{length}"]["perturbations_per_s"]
        at_shapes = gemm["best_model_shape"] * 1e9 / flops
        ceiling[length] = {
            "gflop_per_deletion": round(flops / 1e9, 3),
            "ceiling_per_s_at_model_shapes": round(at_shapes, 1),
            "ceiling_per_s_at_peak": round(gemm["square_2048"] * 1e9 / flops, 1),
            "ours_per_s": ours,
            "ours_gflop_per_s": round(ours * flops / 1e9, 1),
            "ours_over_ceiling_at_model_shapes": harness.ratio(ours, at_shapes),
        }
    report |= {"results": results, "speedup_same_run": speedup, "float32_ceiling": ceiling}
    harness.finish_report(report, args.output)
    print(json.dumps({"speedup_same_run": speedup}, indent=2))


if __name__ == "__main__":
    main()
