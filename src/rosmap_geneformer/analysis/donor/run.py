"""The donor stage in one call: build every method's inputs, cross-validate, score test, write.

Methods (all on the same donors and folds; ``pseudobulk`` is the reference of the paired tests):

| name | reads | fitted per fold |
|---|---|---|
| ``finetuned_mean_p`` | the fine-tuned classifier's mean P(AD) over a donor's task cells | no: trained once by ``train`` |
| ``finetuned_fraction_called`` | ... the share of those cells it calls AD | no |
| ``cell_classifier`` | a cell-level logistic regression on the base model's embeddings of the task's cells, mean P(AD) per donor | yes |
| ``proportions`` | cell-type proportions, logistic regression (L2) | yes |
| ``pseudobulk`` | log CPM of each donor's summed counts, LASSO on the top-variance genes | yes |
| ``pseudobulk_cell_type`` | the same per donor x cell type, side by side (top-variance genes per cell type) | yes |
| ``mil_base`` | gated-attention MIL over the base model's cell embeddings | yes |
| ``mil_finetuned`` | ... over the fine-tuned model's embeddings | yes, but the embeddings were trained on the train donors' labels: its cross-validation is optimistic, its test figure is not |
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer import io
from rosmap_geneformer.analysis import embeddings
from rosmap_geneformer.analysis.donor import crossval, features, methods, mil, plots
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.training import finetune
from rosmap_geneformer.training.tasks import TaskSpec

logger = logging.getLogger(__name__)

REFERENCE = "pseudobulk"
# What metrics.json (a DVC metric, a column each in `dvc exp show`) keeps per method; summary.json
# holds every figure.
HEADLINE = ("cv_auroc", "cv_auroc_sd", "test_auroc", "test_balanced_accuracy")
TOKEN_COLUMNS = ("cell_id", "patient_id", "cell_type")


@dataclass(kw_only=True)
class DonorSettings:
    """``params.yaml: donor``."""

    n_splits: int = 5
    n_repeats: int = 5
    n_boot: int = 1000
    max_cells_per_donor: int | None = 500
    emb_layer: int = -1
    batch_size: int = 32
    C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    max_iter: int = 5000
    pseudobulk_n_top_genes: int = 2000
    pseudobulk_min_cells: int = 3
    pseudobulk_min_cpm: float = 1.0
    pseudobulk_l1_ratio: float = 1.0
    mil: mil.MILSettings = field(default_factory=mil.MILSettings)

    @classmethod
    def from_params(cls, section: Any) -> DonorSettings:
        """From the typed ``donor`` section of :class:`~rosmap_geneformer.params_schema.Params`."""
        return cls(
            n_splits=section.cv.n_splits,
            n_repeats=section.cv.n_repeats,
            n_boot=section.n_boot,
            max_cells_per_donor=section.max_cells_per_donor,
            emb_layer=section.emb_layer,
            batch_size=section.batch_size,
            C=tuple(float(c) for c in section.C),
            max_iter=section.max_iter,
            pseudobulk_n_top_genes=section.pseudobulk.n_top_genes,
            pseudobulk_min_cells=section.pseudobulk.min_cells,
            pseudobulk_min_cpm=float(section.pseudobulk.min_cpm),
            pseudobulk_l1_ratio=float(section.pseudobulk.l1_ratio),
            mil=mil.MILSettings(**section.mil.values(), max_cells_per_donor=None),
        )


@dataclass
class DonorInputs:
    """The stage's files."""

    annotated: Mapping[str, Path]
    matrix: Path
    tokenized: Mapping[str, Path]
    base_model: Path
    finetuned: Path


@dataclass
class DonorRun:
    """What the stage writes: headline metrics, every figure, details, tables and figures."""

    metrics: dict[str, Any]
    summary: dict[str, Any]
    details: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    figures: dict[str, Any]


def _tokenized_cells(
    paths: Mapping[str, Path], *, max_cells_per_donor: int | None, seed: int
) -> tuple[Any, pd.DataFrame]:
    """Every split's tokenized cells as one dataset and one table, at most
    ``max_cells_per_donor`` per donor (a seeded subset, in dataset order)."""
    import datasets

    parts, frames = [], []
    for split, path in paths.items():
        dataset = io.read_dataset(path)
        missing = [c for c in TOKEN_COLUMNS if c not in dataset.column_names]
        if missing:
            msg = (
                f"{path}: lacks column(s) {missing}; rerun tokenize with them in tokenize.columns."
            )
            raise InputError(msg)
        parts.append(dataset)
        frame = dataset.select_columns(list(TOKEN_COLUMNS)).to_pandas()
        frame["split"] = split
        frames.append(frame)
    cells = pd.concat(frames, ignore_index=True)
    cells["patient_id"] = cells["patient_id"].astype(str)
    dataset = datasets.concatenate_datasets(parts)
    if max_cells_per_donor is not None:
        donors = sorted(cells["patient_id"].unique())
        rows = np.sort(
            np.concatenate(
                mil.bag_rows(
                    cells["patient_id"].to_numpy(), donors, max_cells=max_cells_per_donor, seed=seed
                )
            )
        )
        if len(rows) < len(cells):
            logger.info(
                "reading %d of %d tokenized cells: at most %d per donor (donor.max_cells_per_donor)",
                len(rows),
                len(cells),
                max_cells_per_donor,
            )
            dataset = dataset.select(rows.tolist())
            cells = cells.iloc[rows].reset_index(drop=True)
    return dataset, cells


def run_donor_analysis(
    inputs: DonorInputs,
    task: TaskSpec,
    settings: DonorSettings,
    *,
    seed: int = 0,
    chunk_size: int = 10_000,
    special_tokens: bool | None = None,
) -> DonorRun:
    """Every donor method on the same folds and test donors (module docstring).

    Parameters
    ----------
    inputs
        Annotated cell tables and tokenized datasets per split, the count matrix, the base model
        and the task's fine-tuned model.
    task
        The patient-level task (``positive_class``; ``cell_types`` for the cell classifiers).
    settings
        ``params.yaml: donor``.
    seed
        Seeds the folds, every fit and the bootstrap.
    chunk_size
        Cells read at a time for the pseudobulk.
    special_tokens
        Whether cells carry ``<cls>``/``<eos>`` (``None``: detected).
    """
    if not task.patient_level or task.positive_class is None:
        msg = (
            f"params.yaml: tasks.{task.name} needs patient_level: true and a positive_class for "
            "the donor stage (AD status is a donor property)."
        )
        raise InputError(msg)
    mapping = finetune.load_label_mapping(inputs.finetuned)
    classes = list(mapping.get("classes", []))
    if task.positive_class not in classes:
        msg = (
            f"{inputs.finetuned}: its classes {classes} lack tasks.{task.name}.positive_class="
            f"{task.positive_class!r}; retrain it (`dvc repro train@{task.name}`)."
        )
        raise InputError(msg)
    annotated = features.read_annotated(inputs.annotated)
    donors = features.donor_table(annotated, positive_class=task.positive_class)
    cv_ids = donors.index[donors["split"].isin(["train", "val"])].tolist()
    test_ids = donors.index[donors["split"] == "test"].tolist()
    val_ids = donors.index[donors["split"] == "val"].tolist()
    folds = crossval.donor_folds(
        donors.loc[cv_ids],
        n_splits=settings.n_splits,
        n_repeats=settings.n_repeats,
        seed=seed,
    )

    pb = features.pseudobulk(annotated, inputs.matrix, chunk_size=chunk_size)
    genes = features.expressed_genes(pb, cv_ids, min_cpm=settings.pseudobulk_min_cpm)
    all_ids = donors.index.tolist()
    bulk, bulk_report = features.pseudobulk_features(pb, all_ids, genes=genes)
    cell_types = sorted(annotated["cell_type"].astype(str).unique())
    per_type, per_type_report = features.pseudobulk_features(
        pb, all_ids, genes=genes, cell_types=cell_types, min_cells=settings.pseudobulk_min_cells
    )
    shares = features.proportions(annotated, all_ids)

    dataset, cells = _tokenized_cells(
        inputs.tokenized, max_cells_per_donor=settings.max_cells_per_donor, seed=seed
    )
    unknown = sorted(set(cells["patient_id"]) - set(donors.index))
    if unknown:
        msg = (
            f"{len(unknown)} donor(s) of the tokenized datasets (e.g. {unknown[:3]}) are not in "
            f"the annotated cell tables {[str(p) for p in inputs.annotated.values()]}: they come "
            "from different runs. Rerun the stages in between (`dvc repro`)."
        )
        raise InputError(msg)
    vectors = {
        name: embeddings.cell_embeddings(
            path,
            dataset,
            emb_layer=settings.emb_layer,
            batch_size=settings.batch_size,
            special_tokens=special_tokens,
        )
        for name, path in (("base", inputs.base_model), ("finetuned", inputs.finetuned))
    }
    in_task = (
        cells["cell_type"].isin(task.cell_types).to_numpy()
        if task.cell_types
        else np.ones(len(cells), dtype=bool)
    )
    task_rows = np.flatnonzero(in_task)
    # The fine-tuned model trained on the train donors: it scores only val and test donors.
    donor_of = cells["patient_id"].to_numpy()
    predict_rows = task_rows[np.isin(donor_of[task_rows], [*val_ids, *test_ids])]
    probabilities = finetune.predict(
        inputs.finetuned, dataset.select(predict_rows.tolist()), batch_size=settings.batch_size
    )[:, classes.index(task.positive_class)]
    predicted = pd.DataFrame({"patient_id": donor_of[predict_rows], "p": probabilities})
    by_donor = predicted.groupby("patient_id", sort=True)["p"]

    task_note = f"cells of {task.cell_types}" if task.cell_types else "all cells"
    method_list: list[Any] = [
        methods.PrecomputedScores(
            "finetuned_mean_p",
            f"fine-tuned classifier, mean P({task.positive_class}) over a donor's {task_note}",
            by_donor.mean(),
        ),
        methods.PrecomputedScores(
            "finetuned_fraction_called",
            f"fine-tuned classifier, share of a donor's {task_note} called {task.positive_class}",
            predicted.assign(called=predicted["p"] > 0.5).groupby("patient_id")["called"].mean(),
        ),
        methods.CellLogistic(
            "cell_classifier",
            f"cell-level logistic regression on base-model embeddings of {task_note}, mean P per donor",
            embeddings=vectors["base"][task_rows],
            donors=donor_of[task_rows],
            C=settings.C,
            max_iter=settings.max_iter,
        ),
        methods.FeatureLogistic(
            "proportions",
            "cell-type proportions, logistic regression (L2)",
            features=shares,
            C=settings.C,
            l1_ratio=0.0,
            max_iter=settings.max_iter,
        ),
        methods.FeatureLogistic(
            REFERENCE,
            "donor pseudobulk, log CPM, top-variance genes, penalised logistic regression",
            features=bulk,
            C=settings.C,
            l1_ratio=settings.pseudobulk_l1_ratio,
            n_top=settings.pseudobulk_n_top_genes,
            max_iter=settings.max_iter,
        ),
        methods.FeatureLogistic(
            "pseudobulk_cell_type",
            "donor x cell type pseudobulks side by side, top-variance genes per cell type, "
            "same model",
            features=per_type,
            C=settings.C,
            l1_ratio=settings.pseudobulk_l1_ratio,
            n_top=settings.pseudobulk_n_top_genes,
            blocks=[column.split(features.BLOCK_SEPARATOR)[0] for column in per_type.columns],
            max_iter=settings.max_iter,
        ),
    ]
    for name in ("base", "finetuned"):
        method_list.append(
            mil.AttentionMIL(
                f"mil_{name}",
                f"gated-attention MIL over the {name} model's cell embeddings (all cell types)",
                embeddings=vectors[name],
                cells=cells,
                settings=settings.mil,
            )
        )

    scores = crossval.run_methods(
        method_list,
        donors,
        folds=folds,
        cv_donors=cv_ids,
        test_donors=test_ids,
        val_donors=val_ids,
        seed=seed,
    )
    per_method, thresholds = crossval.summarize(
        scores, method_list, reference=REFERENCE, n_boot=settings.n_boot, seed=seed
    )
    return _assemble(
        scores=scores,
        method_list=method_list,
        per_method=per_method,
        thresholds=thresholds,
        donors=donors,
        folds=folds,
        settings=settings,
        task=task,
        reports={"pseudobulk": bulk_report, "pseudobulk_cell_type": per_type_report},
        n_cells={"annotated": len(annotated), "tokenized": len(cells), "task": int(in_task.sum())},
    )


def _assemble(
    *,
    scores: crossval.DonorScores,
    method_list: list[Any],
    per_method: dict[str, dict[str, Any]],
    thresholds: dict[str, float | None],
    donors: pd.DataFrame,
    folds: list[crossval.Fold],
    settings: DonorSettings,
    task: TaskSpec,
    reports: dict[str, Any],
    n_cells: dict[str, int],
) -> DonorRun:
    classes = [c for c in sorted(donors["ad_status"].unique()) if c != task.positive_class]
    classes.append(str(task.positive_class))
    pooled = {
        m.name: crossval.pooled_oof(scores.oof, m.name) for m in method_list if m.cross_validated
    }
    test = {m.name: scores.test[scores.test["method"] == m.name] for m in method_list}
    rows = []
    for name, frame in pooled.items():
        rows.append(frame.assign(method=name, set="cv"))
    for name, frame in test.items():
        rows.append(frame.drop(columns=["method"]).assign(method=name, set="test"))
    if not scores.val.empty:
        rows.append(scores.val.assign(set="val"))
    table = pd.concat(rows, ignore_index=True)
    table["ad_status"] = np.where(table["label"] == 1, classes[1], classes[0])
    # As in the metrics: a method without a threshold (one class only) cuts at 0.5.
    cut = table["method"].map(lambda m: 0.5 if thresholds.get(m) is None else thresholds[m])
    table["called"] = (table["score"] >= cut.astype(float)).astype(np.int64)
    table = table[["method", "patient_id", "set", "label", "ad_status", "score", "called"]]
    table = table.sort_values(["method", "set", "patient_id"], kind="stable").reset_index(drop=True)

    attention = pd.DataFrame(
        columns=["method", "cell_type", "cell_share", "attention_share", "enrichment"]
    )
    attention_cells = pd.DataFrame()
    if not scores.cells.empty:
        attention = pd.concat(
            [
                mil.attention_by_cell_type(part).assign(method=name)
                for name, part in scores.cells.groupby("method", sort=True)
            ],
            ignore_index=True,
        )[["method", "cell_type", "cell_share", "attention_share", "enrichment"]]
        attention_cells = scores.cells.sort_values(
            ["method", "patient_id", "attention"], ascending=[True, True, False], kind="stable"
        ).reset_index(drop=True)

    n_cv = int(donors["split"].isin(["train", "val"]).sum())
    summary = {
        "donors": {
            "cv": n_cv,
            "cv_positive": int(donors.loc[donors["split"] != "test", "label"].sum()),
            "test": int((donors["split"] == "test").sum()),
            "test_positive": int(donors.loc[donors["split"] == "test", "label"].sum()),
        },
        "methods": per_method,
    }
    metrics = {
        name: {k: entry[k] for k in HEADLINE if entry.get(k) is not None}
        for name, entry in per_method.items()
    }
    details = {
        "task": task.name,
        "positive_class": task.positive_class,
        "reference": REFERENCE,
        "settings": {
            **{k: v for k, v in vars(settings).items() if k != "mil"},
            "mil": vars(settings.mil),
        },
        "folds": {"n_splits": settings.n_splits, "n_repeats": settings.n_repeats, "n": len(folds)},
        "methods": {
            m.name: {
                "description": m.description,
                "cross_validated": m.cross_validated,
                "chosen_penalty": getattr(m, "chosen", None),
            }
            for m in method_list
        },
        "features": reports,
        "cells": n_cells,  # annotated (pseudobulk, proportions), tokenized read, task cells
    }
    figures = {
        "roc.png": plots.roc_figure(pooled, test),
        "donor_scores.png": plots.donor_scores_figure(pooled, test, thresholds, classes=classes),
    }
    if not attention.empty:
        figures["attention.png"] = plots.attention_figure(attention)
    oof = scores.oof.sort_values(["method", "repeat", "fold", "patient_id"], kind="stable")
    return DonorRun(
        metrics=metrics,
        summary=summary,
        details=details,
        tables={
            "donors.tsv": table,
            "oof.tsv": oof.reset_index(drop=True),
            "attention.tsv": attention,
            "attention_cells.tsv": attention_cells,
        },
        figures=figures,
    )


def write_donor_run(run: DonorRun, out_dir: str | Path) -> None:
    """Write the metrics, details, tables and figures into ``out_dir`` (a fresh folder)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_json(run.metrics, out_dir / "metrics.json")
    io.write_json(run.summary, out_dir / "summary.json")
    io.write_json(run.details, out_dir / "details.json")
    for name, table in run.tables.items():
        io.write_tsv(table, out_dir / name)
    for name, figure in run.figures.items():
        io.save_figure(figure, out_dir / name)
