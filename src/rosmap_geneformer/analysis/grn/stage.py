"""The ``grn`` stage's computation: edges inferred by deletion, baselines added and, when a
truth network is given, scored.

:func:`grn_dataset` ties :mod:`rosmap_geneformer.analysis.grn.inference` and
:mod:`rosmap_geneformer.analysis.grn.scoring` together on the tokenized split, with the settings
of :mod:`rosmap_geneformer.analysis.grn.settings` and the regulators of
:mod:`rosmap_geneformer.analysis.grn.regulators`;
:mod:`rosmap_geneformer.analysis.grn.tables` turns its summary into the stage's tables.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers import BertModel

from rosmap_geneformer import distributed
from rosmap_geneformer.analysis.grn.attention import (
    ATTENTION_METHODS,
    AttentionStats,
    attention_edges,
)
from rosmap_geneformer.analysis.grn.baselines import (
    coexpression_baseline,
    genie3_baseline,
    grnboost2_baseline,
    random_baseline,
)
from rosmap_geneformer.analysis.grn.inference import infer_grn
from rosmap_geneformer.analysis.grn.regulators import (
    cells_per_token,
    check_regulators,
    resolve_regulators,
)
from rosmap_geneformer.analysis.grn.scoring import (
    TFList,
    Truth,
    case_recovery,
    evaluate_methods,
    load_tf_list,
    load_truth,
    truth_labels,
)
from rosmap_geneformer.analysis.grn.settings import METHODS, GRNSettings
from rosmap_geneformer.counts import MATRIX_ROW, SelectedRows, read_var
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.params import check_names

logger = logging.getLogger(__name__)

# Why perturb.screen's estimate is not used here (written to the report).
GRN_SCREEN = (
    "exact: grn deletes only the regulators (one forward pass per regulator and cell, one more "
    "for its position-matched control) and reads gene embeddings, whose cosine shift has no "
    "first-order term; the estimate of perturb.screen covers shifts of the cell embedding only"
)


def grn_dataset(
    encoder: BertModel,
    dataset: Any,
    *,
    settings: GRNSettings,
    annotation: pd.DataFrame,
    cell_table: pd.DataFrame,
    matrix: str | Path,
    special_tokens: bool,
    pad_token_id: int = 0,
    seed: int = 0,
    progress: bool = True,
    source: str = "the tokenized dataset",
    processes: distributed.Processes | None = None,
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, np.ndarray] | None]:
    """The ``grn`` stage: infer edges by deletion, add the baselines, score against the truth.

    Parameters
    ----------
    encoder
        The model's encoder.
    dataset
        Tokenized cells of ``settings.split`` (``input_ids``, ``cell_id``, ``cell_type``).
    settings
        ``params.yaml: grn``.
    annotation
        Token -> ``ensembl_id``, ``symbol``.
    cell_table
        The sampled cell table of the same split (index: cell ids; ``n_counts``,
        ``matrix_row``), for the co-expression baseline.
    matrix
        The count matrix (raw counts, ``var["ensembl_id"]``); only the rows of the cells used
        for some regulator are read.
    special_tokens
        V2 layout.
    pad_token_id
        The ``<pad>`` id.
    seed
        Seeds the cell subsets and the random baseline.
    progress
        Show progress bars.
    source
        Where ``dataset`` was read (named in the messages).
    processes
        Under a launcher: the deletions and the attention read-out are shared out. Ranks other
        than 0 return after them (edges with the model's columns, no baselines, no scoring):
        rank 0 alone runs the expression baselines and writes.

    Returns
    -------
    The edges (with symbols, the model weight and the co-expression score), the summary for
    the stage report (with the metrics when a truth is given, and ``warnings``: regulators
    absent from the data, a truth network that holds none of them), and the truth labels with
    the method scores (for the PR plot) or ``None``.

    Raises
    ------
    InputError
        When a name of ``grn.cell_types`` matches no cell, or no regulator is in the data.
    """
    from rosmap_geneformer.analysis.embeddings import hidden_layer_index

    layer_index = hidden_layer_index(encoder.config.num_hidden_layers, settings.emb_layer)
    # Read the truth and the TF list first: a mistake there stops the stage before the model runs.
    truth = load_truth(settings.truth, decoys=settings.decoys) if settings.truth else None
    tf_list = load_tf_list(settings.tf_list) if settings.tf_list and truth else None
    types = np.asarray(dataset["cell_type"], dtype=object)
    check_names(
        settings.cell_types,
        {t for t in types.tolist() if t is not None},
        key="grn.cell_types",
        what="cell type",
        source=source,
        column="cell_type",
    )
    keep = (
        np.ones(len(dataset), bool)
        if settings.cell_types is None
        else np.isin(types, list(settings.cell_types))
    )
    rows = np.flatnonzero(keep)
    subset = dataset.select(rows.tolist())
    # numpy rows: a fraction of the memory of Python lists on real data (100k cells x 2,048).
    cells = list(subset.with_format("numpy")["input_ids"])
    names = settings.regulator_names()
    found, missing = resolve_regulators(names, annotation)
    not_expressed, warning = check_regulators(
        names, found, cells_per_token(cells), annotation, settings=settings, source=source
    )
    warnings = [] if warning is None else [warning]
    found = {n: t for n, t in found.items() if n not in not_expressed}
    summary: dict[str, Any] = {
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "layer_index": layer_index,
        "cells": {
            "split": len(dataset),
            "other_cell_types": int((~keep).sum()),
            "used": len(cells),
        },
        "regulators": {
            "requested": len(names),
            "not_in_vocabulary": missing,
            "not_expressed": not_expressed,
        },
        "warnings": warnings,
    }
    result = infer_grn(
        encoder,
        cells,
        list(found.values()),
        layer_index=layer_index,
        special_tokens=special_tokens,
        max_cells=settings.max_cells,
        min_cells=settings.min_cells,
        control=settings.control,
        max_tokens=settings.max_tokens,
        pad_token_id=pad_token_id,
        precision=settings.precision,
        seed=seed,
        progress=progress,
        processes=processes,
    )
    token_name = {t: n for n, t in found.items()}
    n_cells = {token_name[t]: len(c) for t, c in result.cells.items()}
    no_cells = sorted(n for n, c in n_cells.items() if c < 3)
    summary["regulators"].update(
        {
            "cells_per_regulator": n_cells,
            "too_few_cells": no_cells,
            "with_edges": int(result.edges["regulator"].nunique()),
        }
    )
    engine = result.engine
    summary["engine"] = {
        "perturbations": engine.perturbations,
        "forward_passes": engine.forward_passes,
        "screen": GRN_SCREEN,
    }
    # Wall time goes to the log only: cached outputs must not change from run to run.
    logger.info(
        "%d perturbations in %.1f s (%.1f/s)", engine.perturbations, engine.seconds, engine.rate
    )

    edges = result.edges.copy()
    for role in ("regulator", "target"):
        edges[f"{role}_id"] = annotation["ensembl_id"].reindex(edges[role]).to_numpy()
        edges[f"{role}_symbol"] = annotation["symbol"].reindex(edges[role]).to_numpy()

    if "attention" in settings.compare:
        stats = AttentionStats()
        scores = attention_edges(
            encoder,
            cells,
            result.cells,
            edges,
            special_tokens=special_tokens,
            layer=settings.attention_layer,
            max_tokens=settings.max_tokens,
            pad_token_id=pad_token_id,
            progress=progress,
            stats=stats,
            processes=processes,
        )
        edges = pd.concat([edges, scores[list(ATTENTION_METHODS)]], axis=1)
        summary["engine"]["attention"] = {
            "cells": stats.cells,
            "tokens": stats.tokens,
            "forward_passes": stats.forward_passes,
        }
    if processes is not None and not processes.is_main:
        return edges, summary, None
    expression = _expression_baselines(
        edges,
        result.cells,
        settings=settings,
        subset_cell_ids=np.asarray(subset["cell_id"], dtype=object),
        cell_table=cell_table,
        matrix=matrix,
        annotation=annotation,
        seed=seed,
        progress=progress,
    )
    for name, values in expression.items():
        edges[name] = values
    if "random" in settings.compare:
        edges["random"] = random_baseline(len(edges), seed=seed)
    methods = ["weight", "raw_weight", *(c for m in settings.compare for c in METHODS[m])]
    edges = edges[
        [
            "regulator_id",
            "regulator_symbol",
            "target_id",
            "target_symbol",
            *methods[:2],
            "n_cells",
            *methods[2:],
            "regulator",
            "target",
        ]
    ]
    summary["edges"] = {"candidates": len(edges)}

    scoring = None
    if truth is not None:
        scores = {"deletion": edges["weight"].to_numpy()}
        if settings.control != "none":
            scores["deletion_raw"] = edges["raw_weight"].to_numpy()
        scores.update({name: edges[name].to_numpy() for name in methods[2:]})
        summary["evaluation"], labels = evaluate_network(
            edges, scores, truth, tf_list, settings=settings, seed=seed, warnings=warnings
        )
        scoring = {"labels": labels, **scores}
    return edges, summary, scoring


def _expression_baselines(
    edges: pd.DataFrame,
    regulator_cells: Mapping[int, np.ndarray],
    *,
    settings: GRNSettings,
    subset_cell_ids: np.ndarray,
    cell_table: pd.DataFrame,
    matrix: str | Path,
    annotation: pd.DataFrame,
    seed: int,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Co-expression, GRNBoost2 and GENIE3 (those asked for), on the deletion's cells."""
    wanted = [m for m in ("coexpression", "grnboost2", "genie3") if m in settings.compare]
    if not wanted:
        return {}
    cell_rows = pd.Index(cell_table.index).get_indexer(subset_cell_ids)
    if (cell_rows < 0).any():
        msg = (
            f"grn: {(cell_rows < 0).sum()} tokenized cells are missing from the sampled cell "
            f"table of split {settings.split}; rerun tokenize and sample."
        )
        raise InputError(msg)
    column_of = {gene: j for j, gene in enumerate(read_var(matrix)["ensembl_id"])}
    token_columns = {
        int(t): column_of[gene] for t, gene in annotation["ensembl_id"].items() if gene in column_of
    }
    regulator_rows = {r: cell_rows[c] for r, c in regulator_cells.items()}
    used = np.unique(np.concatenate([np.zeros(0, np.int64), *regulator_rows.values()]))
    reader = SelectedRows(matrix, cell_table[MATRIX_ROW].to_numpy(dtype=np.int64)[used])
    used_counts = reader.read(0, reader.n_obs)
    reader.close()
    inputs = {
        "cells": {r: np.searchsorted(used, rows) for r, rows in regulator_rows.items()},
        "counts": used_counts,
        "token_columns": token_columns,
        "n_counts": cell_table["n_counts"].to_numpy(dtype=np.float64)[used],
    }
    out: dict[str, np.ndarray] = {}
    if "coexpression" in wanted:
        out["coexpression"] = coexpression_baseline(edges, **inputs)
    if "grnboost2" in wanted:
        out["grnboost2"] = grnboost2_baseline(edges, **inputs, seed=seed)
    if "genie3" in wanted:
        out["genie3"] = genie3_baseline(
            edges,
            **inputs,
            n_trees=settings.genie3_trees,
            seed=seed,
            n_jobs=settings.workers,
            progress=progress,
        )
    return out


def evaluate_network(
    edges: pd.DataFrame,
    scores: Mapping[str, np.ndarray],
    truth: Truth,
    tf_list: TFList | None,
    *,
    settings: GRNSettings,
    seed: int,
    warnings: list[dict[str, Any]],
) -> tuple[dict[str, Any], np.ndarray]:
    """Score every method's ranking of the edges against the truth.

    Parameters
    ----------
    edges
        Candidate edges with ids and symbols.
    scores
        Method -> score per edge.
    truth
        The truth network (and its cases and decoys).
    tf_list
        Transcription factors for the ``tf`` scope (``None``: all edges only).
    settings
        ``params.yaml: grn`` (``bootstrap``, ``k``).
    seed
        Seeds the bootstrap.
    warnings
        Appended to when no regulator has a truth edge.

    Returns
    -------
    The ``evaluation`` entry of the summary (``truth``, ``tf_list``, ``scopes``: ``all`` and,
    with a TF list, ``tf``, each method -> metrics with intervals; ``per_regulator``;
    ``cases``), and the truth label per edge.
    """
    labels = truth_labels(edges, truth)
    regulators = edges["regulator_symbol"].astype(str).to_numpy()
    truth_regs = truth.regulators()
    evaluable = sorted(
        {
            s
            for s, i in zip(edges["regulator_symbol"], edges["regulator_id"], strict=True)
            if str(s).upper() in truth_regs or str(i) in truth_regs
        }
    )
    if not evaluable:
        entry = {
            "key": "grn.truth",
            "missing": sorted(set(regulators.tolist())),
            "message": (
                f"params.yaml grn.truth: {settings.truth} has no edge from any regulator "
                "used; the scores below rank edges that are all negative. Set grn.truth to "
                "a truth network of these regulators, or leave it empty to skip scoring."
            ),
        }
        logger.warning("%s", entry["message"])
        warnings.append(entry)
    pairs = truth.ids if truth.ids else truth.symbols
    reg_keys = set(edges["regulator_id"]) if truth.ids else {r.upper() for r in regulators}
    out: dict[str, Any] = {
        "truth": {
            "source": truth.source,
            "edges": len(truth),
            "filters": dict(truth.filters),
            "edges_from_used_regulators": sum(1 for a, _ in pairs if a in reg_keys),
            "edges_among_candidates": int(labels.sum()),
        },
        "evaluable_regulators": evaluable,
    }
    scopes = {"all": np.ones(len(edges), dtype=bool)}
    if tf_list is not None:
        is_tf = np.array([r.upper() in tf_list.symbols for r in regulators], dtype=bool)
        out["tf_list"] = {
            **tf_list.source,
            "regulators_tf": sorted(set(regulators[is_tf].tolist())),
            "regulators_not_tf": sorted(set(regulators[~is_tf].tolist())),
        }
        scopes["tf"] = is_tf
    out["scopes"] = {}
    for scope, mask in scopes.items():
        result = evaluate_methods(
            labels[mask],
            {name: np.asarray(v)[mask] for name, v in scores.items()},
            regulators=regulators[mask],
            k_values=settings.k,
            n_boot=settings.bootstrap,
            seed=seed,
        )
        per_regulator = result.pop("per_regulator")
        if scope == "all":
            out["per_regulator"] = per_regulator
        out["scopes"][scope] = result
    if truth.cases:
        keys = zip(regulators, edges["target_symbol"].astype(str), strict=True)
        cases = np.array([truth.cases.get((r.upper(), t.upper()), "") for r, t in keys])
        out["cases"] = case_recovery(cases, labels, scores, regulators)
    headline = out["scopes"]["all"]
    logger.info(
        "AUPRC over random: %s (prevalence %.4f)",
        ", ".join(f"{name} {headline[name]['auprc_ratio']:.2f}" for name in scores),
        headline["deletion"]["prevalence"],
    )
    return out, labels
