"""A simple baseline for every classification task: logistic regression on highly variable genes.

Published evaluations (Boiarsky et al. 2023; Kedzierska et al., Genome Biology 2025) found that a
regularised linear model on log-normalised expression often matches fine-tuned single-cell
foundation models, so every Geneformer result is reported beside this baseline.

The comparison is like for like:

- **Same cells.** Inputs are the sampled splits (raw counts) restricted to the ``cell_id``\\ s of
  the tokenized datasets, because the tokenizer drops cells with no vocabulary gene; then the
  task's cell-type selection and rare-class filter are applied by the same code as fine-tuning
  (:func:`rosmap_geneformer.training.tasks.prepare_task`, ``select_cells``, ``encode_labels``), on the
  tokenized datasets' own label columns. Every drop is counted in the report.
- **Same classes, same ids.** Sorted class names with the positive class (AD) last
  (:meth:`~rosmap_geneformer.training.tasks.TaskSpec.order_classes`).
- **Same selection rule.** ``val`` picks the regularisation strength ``C`` from a small grid by the
  task's early-stopping metric (cell macro-F1, or patient AUROC for donor-level labels); ties go
  to the lower val log-loss. The model is fitted on ``train`` only; ``test`` is touched once.
- **Same scoring.** :func:`rosmap_geneformer.analysis.evaluation.evaluate.evaluate_predictions` with the same
  bootstrap, so ``metrics.json`` has the keys of the ``evaluate`` stage.

Features: counts per 10k (over the genes in the matrix, scanpy's ``normalize_total``), ``log1p``;
highly variable genes chosen on the task's train cells (scanpy ``flavor="seurat"`` on the log
data; ``seurat_v3`` would need scikit-misc); each gene centred and scaled to unit variance on train
and clipped to ``[-10, 10]`` (``sc.pp.scale(max_value=10)``); optionally PCA fitted on train.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import datasets
import numpy as np
import pandas as pd
from scipy import sparse

from rosmap_geneformer import io
from rosmap_geneformer.analysis.evaluation import cell_level, evaluate
from rosmap_geneformer.counts import MATRIX_ROW, SelectedRows, read_cells
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.training import tasks

logger = logging.getLogger(__name__)

# Columns of the tokenized datasets the baseline reads (never input_ids: it uses counts).
META_COLUMNS = ("cell_id", "patient_id", "cell_type", "ad_status")
# sc.pp.scale's usual clip: keeps a few extreme cells from dominating a gene.
CLIP_VALUE = 10.0
# Cells per block when predicting (bounds the dense cells x genes matrix).
_BLOCK_ROWS = 16384
# Seurat's flavor needs at least this many mean bins to normalise dispersions.
_HVG_BINS = 20


@dataclass(kw_only=True)
class BaselineParams:
    """Settings of the logistic-regression baseline (``params.yaml: baseline``).

    Parameters
    ----------
    n_top_genes
        Highly variable genes kept (all genes when the matrix has fewer).
    target_sum
        Counts per cell after normalisation (10,000: CP10k).
    n_components
        PCA components fitted on train before the regression; ``None``: no PCA.
    C
        Grid of inverse regularisation strengths; the best on val is kept.
    l1_ratio
        Elastic-net mixing: 0 = L2 (lbfgs), 1 = L1 (Boiarsky et al.), in between elastic net
        (saga for any value above 0).
    max_iter
        Solver iterations.
    class_weight
        ``"balanced"`` (inverse class frequency, like the fine-tuning loss) or ``None``.
    """

    n_top_genes: int = 2000
    target_sum: float = 1.0e4
    n_components: int | None = 50
    C: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    l1_ratio: float = 0.0
    max_iter: int = 1000
    class_weight: str | None = "balanced"

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> BaselineParams:
        """Build from ``params.yaml: baseline``, refusing unknown keys and bad values."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            msg = f"params.yaml: baseline has unknown key(s) {unknown}; known: {sorted(known)}."
            raise InputError(msg)
        spec = dict(values)
        if "C" in spec and not isinstance(spec["C"], list | tuple):
            spec["C"] = [spec["C"]]
        hyper = cls(**spec)
        hyper.C = sorted(float(c) for c in hyper.C)
        hyper.target_sum = float(hyper.target_sum)
        checks = {
            "n_top_genes": hyper.n_top_genes >= 1,
            "target_sum": hyper.target_sum > 0,
            "n_components": hyper.n_components is None or hyper.n_components >= 1,
            "C": len(hyper.C) >= 1 and all(c > 0 and math.isfinite(c) for c in hyper.C),
            "l1_ratio": 0.0 <= hyper.l1_ratio <= 1.0,
            "max_iter": hyper.max_iter >= 1,
            "class_weight": hyper.class_weight in (None, "balanced"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            msg = (
                f"params.yaml: baseline.{bad[0]}={getattr(hyper, bad[0])!r} is out of range "
                "(n_top_genes >= 1, n_components >= 1 or null, C > 0, 0 <= l1_ratio <= 1, "
                "class_weight balanced or null)."
            )
            raise InputError(msg)
        return hyper


# --------------------------------------------------------------------------------------------
# Cells


def load_cells(path: str | Path) -> datasets.Dataset:
    """The metadata columns of a tokenized dataset (no ``input_ids``), in its row order."""
    path = Path(path)
    dataset = io.read_dataset(path)
    missing = [c for c in META_COLUMNS if c not in dataset.column_names]
    if missing:
        msg = (
            f"{path}: the tokenized dataset lacks column(s) {missing} (has "
            f"{dataset.column_names}); rerun the tokenize stage with them in tokenize.columns."
        )
        raise InputError(msg)
    return dataset.select_columns(list(META_COLUMNS))


def cell_positions(names: pd.Index, cell_ids: Sequence[str], *, source: str | Path) -> np.ndarray:
    """Positions of ``cell_ids`` among ``names`` (in the order of ``cell_ids``).

    Parameters
    ----------
    names
        The cell ids of a sampled split's cell table (its index).
    cell_ids
        Cells the model sees (a tokenized dataset's ``cell_id`` column).
    source
        The cell table's file, for messages.

    Raises
    ------
    ValueError
        When a cell is not in ``names`` (the sampled and tokenized files come from different runs).
    """
    names = pd.Index(names)
    if not names.is_unique:
        dups = names[names.duplicated()].unique()
        msg = f"{source}: {len(dups)} duplicate cell name(s), e.g. {list(dups[:5])}; rerun `dvc repro`."
        raise InputError(msg)
    positions = names.get_indexer(pd.Index([str(c) for c in cell_ids]))
    missing = np.flatnonzero(positions < 0)
    if len(missing):
        examples = [str(cell_ids[i]) for i in missing[:5]]
        msg = (
            f"{source}: {len(missing)} cell(s) of the tokenized dataset are not in the cell table, "
            f"e.g. {examples}; the sampled and tokenized files are out of date with each other "
            "(rerun `dvc repro`)."
        )
        raise InputError(msg)
    return positions


# --------------------------------------------------------------------------------------------
# Features


def log_normalize(counts: sparse.spmatrix, *, target_sum: float = 1.0e4) -> sparse.csr_matrix:
    """``log1p`` of counts scaled to ``target_sum`` per cell (CP10k by default), float32 CSR.

    A cell's total is its sum over the matrix's genes (scanpy's ``normalize_total``); a cell with
    no counts stays all zero.
    """
    matrix = sparse.csr_matrix(counts, dtype=np.float64, copy=True)
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    matrix.data *= np.repeat(scale, np.diff(matrix.indptr))
    np.log1p(matrix.data, out=matrix.data)
    return matrix.astype(np.float32)


def highly_variable_genes(log_counts: sparse.spmatrix, *, n_top_genes: int) -> np.ndarray:
    """Column indices (sorted) of the ``n_top_genes`` most variable genes, Seurat's method.

    scanpy ``flavor="seurat"``: genes binned by mean expression, dispersion normalised within its
    bin, the top ``n_top_genes`` by normalised dispersion. Genes never expressed are not chosen.
    With no more genes than ``n_top_genes``, every expressed gene is kept.
    """
    import scanpy as sc

    n_genes = log_counts.shape[1]
    expressed = np.flatnonzero(np.asarray((log_counts != 0).sum(axis=0)).ravel() > 0)
    if n_top_genes >= len(expressed):
        return expressed
    table = sc.pp.highly_variable_genes(
        ad.AnnData(sparse.csr_matrix(log_counts)),
        flavor="seurat",
        n_top_genes=n_top_genes,
        n_bins=_HVG_BINS,
        inplace=False,
    )
    chosen = np.flatnonzero(table["highly_variable"].to_numpy())
    logger.info("highly variable genes: %d of %d", len(chosen), n_genes)
    return chosen


@dataclass
class FeatureMap:
    """Train-fitted map from log-normalised counts to regression features.

    Attributes
    ----------
    genes
        Column indices of the highly variable genes.
    mean, std
        Per-gene centring and scaling (train; a constant gene gets std 1).
    pca
        A fitted :class:`sklearn.decomposition.PCA`, or ``None``.
    """

    genes: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    pca: Any = None

    @classmethod
    def fit(
        cls,
        log_counts: sparse.spmatrix,
        *,
        n_top_genes: int,
        n_components: int | None,
        seed: int,
    ) -> FeatureMap:
        """Choose genes, scaling and PCA on the training cells."""
        genes = highly_variable_genes(log_counts, n_top_genes=n_top_genes)
        if len(genes) == 0:
            msg = "baseline: no gene is expressed in the training cells; check the sampled split."
            raise InputError(msg)
        dense = _dense(log_counts, genes)
        mean = dense.mean(axis=0)
        std = dense.std(axis=0)
        std[std == 0] = 1.0
        features = cls(genes=genes, mean=mean, std=std)
        if n_components is not None:
            from sklearn.decomposition import PCA

            scaled = features._scale(dense)
            limit = min(scaled.shape) - 1
            used = min(n_components, limit)
            if used < n_components:
                logger.warning(
                    "baseline: n_components=%d reduced to %d (train has %d cells, %d genes)",
                    n_components,
                    used,
                    *scaled.shape,
                )
            if used < 1:
                msg = f"baseline: too few training cells or genes for PCA ({scaled.shape})."
                raise InputError(msg)
            # Exact (eigendecomposition of the gene covariance, genes x genes): no random start,
            # and much faster than a full SVD when cells outnumber the genes.
            features.pca = PCA(n_components=used, svd_solver="covariance_eigh", random_state=seed)
            features.pca.fit(scaled)
        return features

    def _scale(self, dense: np.ndarray) -> np.ndarray:
        return np.clip((dense - self.mean) / self.std, -CLIP_VALUE, CLIP_VALUE)

    def transform(self, log_counts: sparse.spmatrix) -> np.ndarray:
        """Features of any cells (float64, cells x features)."""
        scaled = self._scale(_dense(log_counts, self.genes))
        return scaled if self.pca is None else self.pca.transform(scaled)

    def summary(self) -> dict[str, Any]:
        """Numbers for the report."""
        out: dict[str, Any] = {"n_genes": len(self.genes), "pca_components": None}
        if self.pca is not None:
            out["pca_components"] = int(self.pca.n_components_)
            out["pca_explained_variance"] = float(self.pca.explained_variance_ratio_.sum())
        return out


def _dense(matrix: sparse.spmatrix, columns: np.ndarray) -> np.ndarray:
    return np.asarray(sparse.csr_matrix(matrix)[:, columns].toarray(), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Model


def make_classifier(hyper: BaselineParams, *, C: float, seed: int) -> Any:
    """A seeded :class:`~sklearn.linear_model.LogisticRegression` (lbfgs for L2, saga otherwise)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(
        C=C,
        l1_ratio=hyper.l1_ratio,
        solver="lbfgs" if hyper.l1_ratio == 0 else "saga",
        class_weight=hyper.class_weight,
        max_iter=hyper.max_iter,
        random_state=seed,
    )


def selection_score(
    task: tasks.TaskSpec, y_true: np.ndarray, probabilities: np.ndarray, patient_ids: Any
) -> float:
    """The task's early-stopping metric on val: cell macro-F1 or patient AUROC (as fine-tuning)."""
    from sklearn.metrics import f1_score

    if task.early_stopping_metric == "patient_auroc":
        return tasks.patient_auroc(list(patient_ids), y_true, probabilities[:, 1])
    k = probabilities.shape[1]
    predicted = cell_level.predict_ids(probabilities)
    return float(
        f1_score(y_true, predicted, average="macro", labels=list(range(k)), zero_division=0)
    )


@dataclass
class FittedBaseline:
    """A fitted baseline: features, the regression, and how ``C`` was chosen."""

    features: FeatureMap
    classifier: Any
    classes: list[str]
    selection: dict[str, Any]

    def predict_proba(self, log_counts: sparse.spmatrix) -> np.ndarray:
        """Class probabilities (cells x classes, float64), columns in ``classes`` order.

        Cells go through in blocks, so a whole test split (10^5 cells) never becomes one dense
        cells x genes matrix.
        """
        matrix = sparse.csr_matrix(log_counts)
        out = np.zeros((matrix.shape[0], len(self.classes)), dtype=np.float64)
        for start in range(0, matrix.shape[0], _BLOCK_ROWS):
            block = self.features.transform(matrix[start : start + _BLOCK_ROWS])
            out[start : start + len(block)] = self.classifier.predict_proba(block)
        return out


def fit_baseline(
    train_log: sparse.spmatrix,
    train_labels: np.ndarray,
    val_log: sparse.spmatrix,
    val_labels: np.ndarray,
    val_patients: Sequence[str],
    *,
    task: tasks.TaskSpec,
    classes: Sequence[str],
    hyper: BaselineParams,
    seed: int,
) -> FittedBaseline:
    """Fit features on train, one regression per ``C``, and keep the best ``C`` on val.

    Parameters
    ----------
    train_log, val_log
        Log-normalised counts (:func:`log_normalize`) of the task's train and val cells.
    train_labels, val_labels
        Class ids (indices into ``classes``).
    val_patients
        Patient of each val cell (for patient AUROC).
    task
        Picks the selection metric (``task.early_stopping_metric``).
    classes
        Class names in id order.
    hyper
        Baseline settings.
    seed
        Seeds PCA and the solver.
    """
    from sklearn.metrics import log_loss

    k = len(classes)
    missing = sorted(set(range(k)) - set(np.unique(train_labels).tolist()))
    if missing:
        msg = f"task {task.name}: train has no cell of class(es) {[classes[i] for i in missing]}."
        raise InputError(msg)
    features = FeatureMap.fit(
        train_log, n_top_genes=hyper.n_top_genes, n_components=hyper.n_components, seed=seed
    )
    x_train = features.transform(train_log)
    x_val = features.transform(val_log)
    grid = []
    best: tuple[float, float, float, Any] | None = None
    for C in hyper.C:
        model = make_classifier(hyper, C=C, seed=seed).fit(x_train, train_labels)
        probs = model.predict_proba(x_val)
        score = selection_score(task, val_labels, probs, val_patients)
        loss = float(log_loss(val_labels, probs, labels=list(range(k))))
        logger.info("C=%g: val %s %.4f, log-loss %.4f", C, task.early_stopping_metric, score, loss)
        defined = not math.isnan(score)
        grid.append(
            {
                "C": C,
                f"val_{task.early_stopping_metric}": score if defined else None,
                "val_log_loss": loss,
            }
        )
        if not defined:
            if len(hyper.C) > 1:
                msg = (
                    f"task {task.name}: val {task.early_stopping_metric} is undefined (val lacks "
                    "a class); C cannot be chosen. Give baseline.C a single value."
                )
                raise InputError(msg)
            score = -math.inf
        # Higher score wins; ties go to the lower log-loss, then to the smaller C (grid order).
        if best is None or (score, -loss) > (best[0], -best[1]):
            best = (score, loss, C, model)
    assert best is not None
    selection = {
        "metric": task.early_stopping_metric,
        "chosen_C": best[2],
        "grid": grid,
        "n_iter": int(np.max(best[3].n_iter_)),
        "converged": bool(np.max(best[3].n_iter_) < hyper.max_iter),
    }
    if not selection["converged"]:
        logger.warning(
            "baseline: the solver hit max_iter=%d; raise baseline.max_iter", hyper.max_iter
        )
    return FittedBaseline(
        features=features, classifier=best[3], classes=list(classes), selection=selection
    )


# --------------------------------------------------------------------------------------------
# One call


def _log_counts(
    rows: SelectedRows, start: int, end: int, *, hyper: BaselineParams
) -> sparse.csr_matrix:
    counts = rows.read(start, end)
    io.check_raw_values(counts, source=rows.path)
    return log_normalize(counts, target_sum=hyper.target_sum)


@dataclass
class SplitInput:
    """One split's files: the sampled cell table, the count matrix and the tokenized dataset."""

    cells: Path
    matrix: Path
    tokenized: Path


def run_baseline(
    task: tasks.TaskSpec,
    splits: Mapping[str, SplitInput],
    *,
    hyper: BaselineParams,
    seed: int,
    n_boot: int = 1000,
) -> evaluate.Evaluation:
    """Fit the baseline on train, choose ``C`` on val and score it on test like ``evaluate``.

    Parameters
    ----------
    task
        The classification task (cell selection, label, classes).
    splits
        ``train``, ``val`` and ``test`` inputs.
    hyper
        Baseline settings.
    seed
        Seeds PCA, the solver and the bootstrap.
    n_boot
        Bootstrap resamples for the intervals.

    Returns
    -------
    The :class:`~rosmap_geneformer.analysis.evaluation.evaluate.Evaluation`; ``details["baseline"]`` holds the
    settings, the features, the ``C`` grid with val scores and the cell counts of every filter,
    ``details["test_cells"]`` the test cells left out (as in ``evaluate``).
    """
    missing = [s for s in ("train", "val", "test") if s not in splits]
    if missing:
        msg = f"run_baseline: no input for split(s) {missing}."
        raise InputError(msg)
    cells = {name: load_cells(splits[name].tokenized) for name in ("train", "val", "test")}
    prepared = tasks.prepare_task(cells["train"], cells["val"], task)
    classes = prepared.classes
    test, test_other = tasks.select_cells(cells["test"], task, source=str(splits["test"].tokenized))
    n_test_selected = len(test)
    test = tasks.encode_labels(test, task, classes)
    chosen = {"train": prepared.train, "val": prepared.val, "test": test}

    log_counts: dict[str, sparse.csr_matrix] = {}
    readers: dict[str, SelectedRows] = {}
    counts_report: dict[str, dict[str, int]] = {}
    for name, subset in chosen.items():
        split = splits[name]
        table = read_cells(split.cells, what="sampled cell table")
        # Cells the tokenizer dropped are counted against the whole split, before task filters.
        n_tokenized = len(cell_positions(table.index, cells[name]["cell_id"], source=split.cells))
        rows = cell_positions(table.index, subset["cell_id"], source=split.cells)
        counts_report[name] = {
            "cells_sampled": len(table),
            "cells_tokenized": n_tokenized,
            "cells_not_tokenized": len(table) - n_tokenized,
            "cells_for_task": len(rows),
        }
        readers[name] = SelectedRows(split.matrix, table[MATRIX_ROW].to_numpy()[rows])
    # Train and val are bounded by the sampling caps; test (kept whole) is read block by block.
    for name in ("train", "val"):
        log_counts[name] = _log_counts(readers[name], 0, readers[name].n_obs, hyper=hyper)

    fitted = fit_baseline(
        log_counts["train"],
        np.asarray(prepared.train["label"], dtype=np.int64),
        log_counts["val"],
        np.asarray(prepared.val["label"], dtype=np.int64),
        prepared.val["patient_id"],
        task=task,
        classes=classes,
        hyper=hyper,
        seed=seed,
    )
    test_rows = readers["test"]
    blocks = [
        fitted.predict_proba(_log_counts(test_rows, start, end, hyper=hyper))
        for start, end in test_rows.chunks(_BLOCK_ROWS)
    ]
    probabilities = (
        np.concatenate(blocks) if blocks else np.zeros((0, len(classes)), dtype=np.float64)
    )
    for reader in readers.values():
        reader.close()
    result = evaluate.evaluate_predictions(
        test["cell_id"],
        test["patient_id"],
        test["label"],
        probabilities,
        classes=classes,
        task_kind="disease" if task.patient_level else "cell_type",
        n_boot=n_boot,
        seed=seed,
    )
    result.details["test_cells"] = {
        "other_cell_types": test_other,
        "unseen_class": n_test_selected - len(test),
        "evaluated": len(test),
    }
    result.details["baseline"] = {
        "model": "logistic regression on scaled log1p CP10k of train-chosen highly variable "
        + ("genes" if hyper.n_components is None else "genes, after PCA"),
        "params": asdict(hyper),
        "features": fitted.features.summary(),
        "selection": fitted.selection,
        "task": prepared.report,
        "cells": counts_report,
    }
    return result
