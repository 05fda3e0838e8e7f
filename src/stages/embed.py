"""Stage embed: cell embeddings of the test cells from the base and every fine-tuned model.

Geneformer's convention (mean over gene positions of layer `embed.emb_layer`, -1 = second to
last, special tokens excluded). Writes the embeddings as one `.h5ad` (`obsm["X_<model>"]`, plus
`obsm["X_umap_<model>"]`), UMAP figures coloured by cell type, AD status and patient, and the
silhouette score of each label per model as the stage's metric. With `embed.hvg_pca` set, the
PCA of the highly variable genes of the same cells (raw counts from the sampled test split) is
reported beside the models as a model-free reference (`hvg_pca`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rosmap_geneformer import counts, distributed, io
from rosmap_geneformer.analysis import baselines, embedding_report, embeddings
from rosmap_geneformer.errors import InputError, MissingInputError, run_stage
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import stage_arguments

logger = logging.getLogger("stage.embed")
OBS_COLUMNS = ("patient_id", "cell_type", "ad_status")


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    processes = distributed.start(params.compute.threads)
    seed = params.seed
    settings = params.embed
    emb_layer = int(settings.emb_layer)

    models = {"base": Path(params.paths.base_model)}
    for task in params.tasks:
        models[f"finetuned_{task}"] = Path(params.paths.finetuned) / task
    missing = [str(path) for path in models.values() if not path.is_dir()]
    if missing:
        msg = f"embed: model folder(s) {missing} not found; run base_model and train first."
        raise MissingInputError(msg)

    test_path = Path(params.paths.tokenized) / "test.dataset"
    test = io.read_dataset(test_path)
    absent = [c for c in ("cell_id", *OBS_COLUMNS) if c not in test.column_names]
    if absent:
        msg = (
            f"{test_path}: lacks column(s) {absent}; rerun tokenize with them in tokenize.columns."
        )
        raise InputError(msg)
    rows = embedding_report.subsample(len(test), settings.max_cells, seed=seed)
    if len(rows) < len(test):
        logger.info("embedding a seeded subsample of %d of %d test cells", len(rows), len(test))
        test = test.select(rows.tolist())
    obs = pd.DataFrame(
        {c: test[c] for c in OBS_COLUMNS}, index=pd.Index(test["cell_id"], name=None)
    )

    vectors: dict[str, np.ndarray] = {}
    layers: dict[str, int] = {}
    runtime: dict[str, float] = {}
    special = params.tokenize.special_tokens
    for name, path in models.items():
        start = time.perf_counter()
        encoder, config = embeddings.load_encoder(path)
        layers[name] = embeddings.hidden_layer_index(config.num_hidden_layers, emb_layer)
        vectors[name] = embeddings.cell_embeddings(
            path,
            test,
            emb_layer=emb_layer,
            batch_size=int(settings.batch_size),
            special_tokens=special,
            encoder=encoder,
            processes=processes,
        )
        runtime[name] = time.perf_counter() - start
        logger.info(
            "%s: %d cells x %d dims from hidden_states[%d] in %.1f s",
            name,
            *vectors[name].shape,
            layers[name],
            runtime[name],
        )

    # The other processes helped with the models; rank 0 alone goes on and writes.
    distributed.end(wait=False)
    if not processes.is_main:
        return
    reference = settings.hvg_pca
    if reference:
        table_path = Path(params.paths.sampled) / "test.parquet"
        table = counts.read_cells(table_path, what="sampled test cell table")
        positions = baselines.cell_positions(table.index, test["cell_id"], source=table_path)
        # Only the embedded cells' rows (embed.max_cells) are read from the matrix.
        reader = counts.SelectedRows(
            params.paths.ensembl, table[counts.MATRIX_ROW].to_numpy()[positions]
        )
        matrix = reader.read(0, reader.n_obs)
        reader.close()
        io.check_raw_values(matrix, source=reader.path)
        vectors["hvg_pca"] = embedding_report.hvg_pca_embedding(
            matrix,
            n_top_genes=int(reference.n_top_genes),
            n_components=int(reference.n_components),
            seed=seed,
        )
        del matrix
    adata = embedding_report.build_anndata(obs, vectors)
    start = time.perf_counter()
    scores, figures = embedding_report.embedding_report(
        adata,
        models=list(vectors),
        n_neighbors=int(settings.n_neighbors),
        metric=str(settings.metric),
        silhouette_max_cells=settings.silhouette_max_cells,
        seed=seed,
    )
    logger.info("UMAPs and silhouettes in %.1f s", time.perf_counter() - start)
    adata.uns["embed"] = {
        "emb_layer": emb_layer,
        "hidden_states_index": layers,
        "special_tokens_excluded": special,
        "pooling": "mean over gene positions (padding and special tokens excluded)",
        "models": {name: path.as_posix() for name, path in models.items()},
        "test_cells": len(rows),
    }
    if reference:
        adata.uns["embed"]["hvg_pca"] = dict(reference)
    io.write_h5ad(adata, Path(params.paths.embeddings) / "test.h5ad")
    out_dir = Path(params.paths.reports) / "embed"
    io.write_json(scores, out_dir / "metrics.json")
    for name, figure in figures.items():
        io.save_figure(figure, out_dir / f"umap_{name}.png")
    logger.info(
        "embed: %s (embedding time %s s)",
        scores,
        {k: round(v, 1) for k, v in runtime.items()},
    )


if __name__ == "__main__":
    run_stage(main)
