"""Stage perturb: in silico deletion and overexpression of genes in start-state cells (default:
AD microglia under the disease model), ranked by the shift of the cells' embeddings towards the
goal state (control), with rank-sum tests against the pooled null and BH FDR."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from rosmap_geneformer import counts, distributed, io
from rosmap_geneformer.analysis import embeddings
from rosmap_geneformer.analysis.perturbation.annotation import plot_top_genes, token_annotation
from rosmap_geneformer.analysis.perturbation.screen import PerturbSettings, perturb_dataset
from rosmap_geneformer.errors import run_stage
from rosmap_geneformer.geneformer.dictionaries import PAD, TOKEN_DICTIONARY_FILE
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import check_names, stage_arguments

logger = logging.getLogger("stage.perturb")


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    processes = distributed.start(params.compute.threads)
    settings = PerturbSettings.from_params(params.perturb.values())
    if params.tasks is not None:
        check_names(
            [settings.task],
            params.tasks,
            key="perturb.task",
            what="task",
            source="params.yaml tasks",
        )
    seed = params.seed
    torch.manual_seed(seed)

    model_dir = Path(params.paths.finetuned) / settings.task
    dataset_path = Path(params.paths.tokenized) / f"{settings.split}.dataset"
    dataset = io.read_dataset(dataset_path)
    with (Path(params.paths.dictionaries) / TOKEN_DICTIONARY_FILE).open("rb") as fh:
        token_dictionary = pickle.load(fh)
    var = counts.read_var(params.paths.ensembl)
    annotation = token_annotation(
        token_dictionary, dict(zip(var["ensembl_id"], var["gene_symbol"], strict=True))
    )
    special_tokens = embeddings.detect_special_tokens(dataset, token_dictionary=token_dictionary)

    encoder, _ = embeddings.load_encoder(model_dir)
    tables, summary = perturb_dataset(
        encoder,
        dataset,
        settings=settings,
        annotation=annotation,
        special_tokens=special_tokens,
        pad_token_id=int(token_dictionary[PAD]),
        seed=seed,
        source=dataset_path.as_posix(),
        processes=processes,
    )
    # Every process holds the same tables; rank 0 alone writes them.
    distributed.end(wait=False)
    if not processes.is_main:
        return
    summary["model"] = str(model_dir)
    summary["special_tokens"] = special_tokens

    out_dir = Path(params.paths.reports) / "perturb"
    where = f"{settings.start_state} {settings.cell_type or 'all'} cells ({settings.task} model)"
    for perturb_type, table in tables.items():
        io.write_tsv(table, out_dir / f"{perturb_type}.tsv")
        fig = plot_top_genes(
            table,
            top_n=settings.top_n,
            goal_state=settings.goal_state,
            title=f"{perturb_type}: top {settings.top_n} genes, {where}",
            column="mean_shift" if settings.rank_by == "goal" else "net_mean_shift",
        )
        io.save_figure(fig, out_dir / f"{perturb_type}_top_genes.png")
    io.write_json(summary, out_dir / "summary.json")


if __name__ == "__main__":
    run_stage(main)
