"""Stage grn: a gene regulatory network by in silico deletion of regulators (Geneformer's
cell-and-gene mode), written as an edge list, GraphML and a network plot, and, when a truth
network is configured, scored as the field does (AUPRC, AUPRC over random, EPR, precision at k;
all edges and TF regulators; bootstrap intervals over regulators) next to attention-based
networks from the same model and cells, co-expression, GRNBoost2, GENIE3 and random scores."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from rosmap_geneformer import counts, distributed, io
from rosmap_geneformer.analysis import embeddings
from rosmap_geneformer.analysis.grn import network
from rosmap_geneformer.analysis.grn.settings import GRNSettings
from rosmap_geneformer.analysis.grn.stage import grn_dataset
from rosmap_geneformer.analysis.grn.tables import methods_table, metrics_summary
from rosmap_geneformer.analysis.perturbation.annotation import token_annotation
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.geneformer.dictionaries import PAD, TOKEN_DICTIONARY_FILE
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import check_demo_only, stage_arguments

logger = logging.getLogger("stage.grn")


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    processes = distributed.start(params.compute.threads)
    # Real data must not be scored against the demo's planted network with its regulators.
    check_demo_only(params, ["grn"])
    settings = GRNSettings.from_params(params.grn.values())
    seed = params.seed
    torch.manual_seed(seed)

    model_dir = Path(settings.model)
    dataset_path = Path(params.paths.tokenized) / f"{settings.split}.dataset"
    dataset = io.read_dataset(dataset_path)
    with (Path(params.paths.dictionaries) / TOKEN_DICTIONARY_FILE).open("rb") as fh:
        token_dictionary = pickle.load(fh)
    matrix = Path(params.paths.ensembl)
    cells = counts.read_cells(
        Path(params.paths.sampled) / f"{settings.split}.parquet", what="sampled cell table"
    )
    var = counts.read_var(matrix)
    annotation = token_annotation(
        token_dictionary, dict(zip(var["ensembl_id"], var["gene_symbol"], strict=True))
    )
    special_tokens = embeddings.detect_special_tokens(dataset, token_dictionary=token_dictionary)

    encoder, _ = embeddings.load_encoder(model_dir)
    edges, summary, scoring = grn_dataset(
        encoder,
        dataset,
        settings=settings,
        annotation=annotation,
        cell_table=cells,
        matrix=matrix,
        special_tokens=special_tokens,
        pad_token_id=int(token_dictionary[PAD]),
        seed=seed,
        source=dataset_path.as_posix(),
        processes=processes,
    )
    # The other processes helped with the model's work; rank 0 alone goes on and writes.
    distributed.end(wait=False)
    if not processes.is_main:
        return
    summary["model"] = str(model_dir)

    # The network (large on real data) is a cached DVC output; the small reports go to git.
    network_dir = Path(params.paths.grn)
    out_dir = Path(params.paths.reports) / "grn"
    io.write_tsv(edges.drop(columns=["regulator", "target"]), network_dir / "edges.tsv")
    network.write_graphml(
        network.network_graph(network.top_edges(edges, settings.graph_top_edges)),
        network_dir / "network.graphml",
    )
    fig = network.plot_network(
        network.top_edges(edges, settings.plot_top_edges),
        seed=seed,
        title=f"top {settings.plot_top_edges} targets per regulator (deletion, {model_dir})",
    )
    io.save_figure(fig, out_dir / "network.png")
    if scoring is not None:
        fig = network.plot_pr_epr(
            scoring, summary["evaluation"], title=f"edges vs {Path(str(settings.truth)).name}"
        )
        io.save_figure(fig, out_dir / "pr_epr.png")
        io.write_tsv(methods_table(summary), out_dir / "methods.tsv")
    io.write_json(summary, out_dir / "summary.json")
    io.write_json(metrics_summary(summary), out_dir / "metrics.json")


if __name__ == "__main__":
    run_stage(main)
