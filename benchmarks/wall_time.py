"""Wall time of a full in silico deletion screen, before booking a cluster (a model, not a test):
``python benchmarks/wall_time.py --cells 79188 --gpus 1 4 8``.

A screen deletes every gene of every cell: ``cells x genes per cell`` forward passes of one cell
(Geneformer runs them in batches; the cost per cell is the same). One forward pass costs
``2 x layers x L x (4 h^2 + 2 h i + 2 L h)`` floating-point operations at ``L`` tokens (the
dense layers and the attention; the embeddings are a lookup). The hours are::

    cells x genes per cell x FLOPs per pass / (GPUs x peak FLOP/s x utilisation)

with the dense bf16 tensor-core peak of NVIDIA's datasheets and a range of utilisation (the
share of the peak a forward pass reaches), which is an assumption, not a measurement: nothing
here ran on a GPU. Measure one GPU's rate (deletions per second at the model's length,
``benchmarks/grn_throughput.py`` or ``benchmarks/perturbation.py`` on that GPU) and pass it
with ``--rate`` to replace the assumption. ``benchmarks/processes.py`` calls :func:`plan` with
this machine's measured CPU rate, which also shows what utilisation of its own peak it reached.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

# Layer shapes (Theodoris et al. 2023; Chen et al. 2024) and the genes per cell each reads.
MODELS: dict[str, dict[str, int]] = {
    "V1-10M": {"layers": 6, "hidden": 256, "intermediate": 512, "length": 2048},
    "V2-104M": {"layers": 12, "hidden": 768, "intermediate": 3072, "length": 4096},
}
# Dense bf16 tensor-core peaks (no sparsity), NVIDIA A100 and H100 SXM datasheets.
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12}
# Assumed share of that peak an encoder forward pass sustains (batched, SDPA attention).
UTILISATION = (0.2, 0.5)
# ROSMAP's microglia (Mathys et al. 2023: 79,188 Mic nuclei) and a 1,000-cell sample of them.
MICROGLIA = 79_188
SAMPLE = 1_000


def tokens(model: str, genes: int | None = None) -> int:
    """Tokens of a cell with ``genes`` detected genes (all: the model's input size)."""
    length = MODELS[model]["length"]
    return length if genes is None else min(genes, length)


def forward_flops(*, layers: int, hidden: int, intermediate: int, length: int) -> float:
    """Floating-point operations (2 per multiply-add) of a BERT encoder's forward pass over one
    cell of ``length`` tokens: per layer and token the projections (4 h^2), the feed-forward
    (2 h i) and the attention (2 L h). Normalisations, softmax and the embedding lookup are
    left out (a few percent at most)."""
    per_token = 4 * hidden**2 + 2 * hidden * intermediate + 2 * length * hidden
    return 2.0 * layers * length * per_token


def flops_per_pass(model: str, genes: int | None = None) -> float:
    """:func:`forward_flops` of one cell (:func:`tokens` long) through every layer of ``model``
    (the engine stops at the layer it reads, by default one before the last: an upper bound)."""
    m = MODELS[model]
    return forward_flops(
        layers=m["layers"],
        hidden=m["hidden"],
        intermediate=m["intermediate"],
        length=tokens(model, genes),
    )


def hours(
    model: str, cells: int, *, rate_per_device: float, devices: int = 1, genes: int | None = None
) -> float:
    """Wall hours of the screen (every gene of every cell deleted) at ``rate_per_device``
    deletions per second on each device; the cells are shared evenly over the devices."""
    return cells * tokens(model, genes) / (rate_per_device * devices) / 3600.0


def gpu_rate(model: str, gpu: str, utilisation: float, genes: int | None = None) -> float:
    """Deletions per second of one GPU at ``utilisation`` of its datasheet peak."""
    return GPU_PEAK_FLOPS[gpu] * utilisation / flops_per_pass(model, genes)


def plan(
    *,
    models: tuple[str, ...] = tuple(MODELS),
    cells: tuple[int, ...] = (SAMPLE, MICROGLIA),
    gpus: tuple[int, ...] = (1, 4, 8),
    genes: int | None = None,
    cpu_rate_v1: float | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """The planning table: hours per model, cells and GPUs (low-high over :data:`UTILISATION`).

    Parameters
    ----------
    models
        Keys of :data:`MODELS`.
    cells
        Screen sizes.
    gpus
        GPU counts.
    genes
        Genes detected per cell; ``None`` (every cell fills the model's input: an upper bound).
    cpu_rate_v1
        This machine's measured V1-10M deletions per second at 2,048 tokens; adds its hours
        and its FLOP/s.
    rate
        A measured deletions per second of one GPU with the one model of ``models``; its hours
        stand beside the utilisation range.
    """
    if rate and len(models) != 1:
        msg = f"--rate is one model's rate: name that model with --model (one of {list(MODELS)})."
        raise SystemExit(msg)
    table: dict[str, Any] = {}
    for model in models:
        rows: dict[str, Any] = {
            "flops_per_pass": flops_per_pass(model, genes),
            "deletions_per_cell": tokens(model, genes),
        }
        for n_cells in cells:
            by_gpu: dict[str, Any] = {}
            for gpu in GPU_PEAK_FLOPS:
                slow, fast = (gpu_rate(model, gpu, u, genes) for u in UTILISATION)
                by_gpu[gpu] = {
                    str(n): [
                        round(hours(model, n_cells, rate_per_device=r, devices=n, genes=genes), 2)
                        for r in (fast, slow)
                    ]
                    for n in gpus
                }
            if rate:
                by_gpu["measured_rate"] = {
                    str(n): round(
                        hours(model, n_cells, rate_per_device=rate, devices=n, genes=genes), 2
                    )
                    for n in gpus
                }
            rows[f"{n_cells}_cells_gpu_hours"] = by_gpu
        table[model] = rows
    report: dict[str, Any] = {
        "formula": "cells x genes per cell x FLOPs per pass / (GPUs x peak x utilisation)",
        "gpu_peak_flops_bf16_dense": GPU_PEAK_FLOPS,
        "utilisation_assumed": list(UTILISATION),
        "hours_are": "[at the high utilisation, at the low one]",
        "models": table,
    }
    if cpu_rate_v1:
        achieved = cpu_rate_v1 * flops_per_pass("V1-10M")
        report["this_machine"] = {
            "v1_10m_2048_deletions_per_s": round(cpu_rate_v1, 3),
            "achieved_gflops": round(achieved / 1e9, 1),
            "hours": {
                model: {
                    str(n): round(
                        hours(
                            model,
                            n,
                            rate_per_device=achieved / flops_per_pass(model, genes),
                            genes=genes,
                        ),
                        1,
                    )
                    for n in cells
                }
                for model in models
            },
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), nargs="+", default=list(MODELS))
    parser.add_argument("--cells", type=int, nargs="+", default=[SAMPLE, MICROGLIA])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument(
        "--genes", type=int, help="genes detected per cell (default: the model's input size)"
    )
    parser.add_argument("--rate", type=float, help="measured deletions/s of one GPU")
    args = parser.parse_args(argv)
    report = plan(
        models=tuple(args.model),
        cells=tuple(args.cells),
        gpus=tuple(args.gpus),
        genes=args.genes,
        rate=args.rate,
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
