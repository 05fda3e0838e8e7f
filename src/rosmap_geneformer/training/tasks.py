"""Classification tasks and their labels: which cells, which classes, which ids, which val metric.

A :class:`TaskSpec` is one ``params.yaml: tasks`` entry. :func:`prepare_task` selects its cells,
fixes the class list from ``train`` (sorted, positive class last, so ids are stable across runs and
machines) and drops rare classes, with counts. Shared by fine-tuning, the hyperparameter search and
the baselines, so every model sees the same cells, classes and ids. :func:`patient_auroc` is the
val metric of a donor-level task (AD status is a donor property).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from rosmap_geneformer.errors import InputError
from rosmap_geneformer.losses import Limit, check_loss
from rosmap_geneformer.params import check_names, names_warning, unknown_names

logger = logging.getLogger(__name__)

EARLY_STOPPING_METRICS = ("macro_f1", "patient_auroc")


@dataclass(kw_only=True)
class TaskSpec:
    """One classification task.

    Parameters
    ----------
    name
        Task name (``cell_type``, ``disease``).
    label
        Dataset column holding the class of each cell.
    cell_types
        Keep only cells of these major cell types (``None``: all).
    min_cells_per_class
        Classes with fewer training cells are dropped from every split (counted).
    patient_level
        The label is a donor property (AD status): evaluate per patient as well, on the mean
        P(``positive_class``) of each patient's cells.
    positive_class
        For binary tasks, the class given id 1 (the "positive" class of ROC curves).
    early_stopping_metric
        ``macro_f1`` (cell level) or ``patient_auroc``; default: ``patient_auroc`` for
        patient-level tasks, ``macro_f1`` otherwise.
    rare_class_limit
        ``params.yaml: losses.rare_class_cells``: the share of the task's train cells that the
        rare classes may hold before :func:`prepare_task` warns and stops. ``None``: counted,
        not checked (for callers without ``params.yaml``).
    """

    name: str
    label: str
    cell_types: list[str] | None = None
    min_cells_per_class: int = 1
    patient_level: bool = False
    positive_class: str | None = None
    early_stopping_metric: str | None = None
    rare_class_limit: Limit | None = None

    def __post_init__(self) -> None:
        if self.early_stopping_metric is None:
            self.early_stopping_metric = "patient_auroc" if self.patient_level else "macro_f1"
        if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
            msg = (
                f"params.yaml: tasks.{self.name}.early_stopping_metric="
                f"{self.early_stopping_metric!r}; use one of {EARLY_STOPPING_METRICS}."
            )
            raise InputError(msg)
        if self.early_stopping_metric == "patient_auroc" and not self.patient_level:
            msg = f"params.yaml: tasks.{self.name}: patient_auroc needs patient_level: true."
            raise InputError(msg)

    @classmethod
    def from_params(
        cls, name: str, spec: Mapping[str, Any], *, rare_class_limit: Limit | None = None
    ) -> TaskSpec:
        """Build from ``params.yaml: tasks.<name>``, refusing unknown keys.

        ``rare_class_limit`` is ``params.yaml: losses.rare_class_cells`` (the stage scripts
        pass it; ``None`` leaves the loss unchecked).
        """
        known = set(cls.__dataclass_fields__) - {"name", "rare_class_limit"}
        unknown = sorted(set(spec) - known)
        if unknown:
            msg = f"params.yaml: tasks.{name} has unknown key(s) {unknown}; known: {sorted(known)}."
            raise InputError(msg)
        return cls(name=name, rare_class_limit=rare_class_limit, **spec)

    def order_classes(self, present: Sequence[str]) -> list[str]:
        """Sorted class names, with ``positive_class`` moved last (id 1 in a binary task)."""
        classes = sorted(str(c) for c in present)
        if self.positive_class is not None:
            check_names(
                [self.positive_class],
                classes,
                key=f"tasks.{self.name}.positive_class",
                what="class",
                source="the training classes",
                column=self.label,
            )
            classes.remove(self.positive_class)
            classes.append(self.positive_class)
        return classes


@dataclass(kw_only=True)
class PreparedTask:
    """Datasets with integer ``label`` columns, the class names and what was filtered."""

    train: datasets.Dataset
    val: datasets.Dataset
    classes: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def dataset_source(dataset: datasets.Dataset, fallback: str) -> str:
    """The folder a dataset was loaded from (``save_to_disk`` layout), else ``fallback``."""
    files = getattr(dataset, "cache_files", None) or []
    if not files or not files[0].get("filename"):
        return fallback
    folder = Path(files[0]["filename"]).parent
    if folder.is_relative_to(Path.cwd()):
        folder = folder.relative_to(Path.cwd())
    return folder.as_posix()


def select_cells(
    dataset: datasets.Dataset,
    task: TaskSpec,
    *,
    source: str,
    strict: bool = False,
    warnings: list[dict[str, Any]] | None = None,
) -> tuple[datasets.Dataset, int]:
    """Cells of the task's cell types; returns the subset and how many were left out.

    Parameters
    ----------
    dataset
        Tokenized cells with the task's label, ``cell_type`` and ``patient_id``.
    task
        The task.
    source
        The dataset's file, named in the messages.
    strict
        Every name of ``tasks.<name>.cell_types`` must match cells (the train split: a misspelt
        cell type would otherwise be left out without a word). Otherwise (val, test) the names
        with no cell are a warning, and only a list that matches nothing is refused.
    warnings
        Where the warning entries of a lenient check are appended (the stage's report).

    Raises
    ------
    InputError
        When the label (``tasks.<name>.label``) or another needed column is missing, when a cell
        type matches no cell (``strict``), or when none does.
    """
    for key, column in (
        (f"tasks.{task.name}.label", task.label),
        (None, "cell_type"),
        (None, "patient_id"),
    ):
        if column in dataset.column_names:
            continue
        if key is not None:
            fix = (
                "Fix the name in params.yaml, or add the column to tokenize.columns and rerun "
                "the tokenize stage."
            )
            check_names(
                [column], dataset.column_names, key=key, what="column", source=source, fix=fix
            )
        msg = (
            f"{source}: the tokenized dataset lacks column {column!r} (has "
            f"{dataset.column_names}); rerun the tokenize stage with it in tokenize.columns."
        )
        raise InputError(msg)
    if not task.cell_types:
        return dataset, 0
    key = f"tasks.{task.name}.cell_types"
    types = dataset["cell_type"]
    present = {t for t in types if t is not None}
    absent = unknown_names(task.cell_types, present)
    if strict or len(absent) == len(set(task.cell_types)):
        check_names(
            task.cell_types, present, key=key, what="cell type", source=source, column="cell_type"
        )
    if absent:
        entry = names_warning(
            absent,
            present,
            key=key,
            what="cell type",
            source=source,
            column="cell_type",
            consequence="This split is scored on the other cell types",
        )
        logger.warning("%s", entry["message"])
        if warnings is not None:
            warnings.append(entry)
    wanted = set(task.cell_types)
    keep = [i for i, t in enumerate(types) if t in wanted]
    return dataset.select(keep), len(dataset) - len(keep)


def encode_labels(
    dataset: datasets.Dataset, task: TaskSpec, classes: Sequence[str]
) -> datasets.Dataset:
    """Keep cells whose class is in ``classes`` and add an int64 ``label`` column (index in ``classes``)."""
    index = {c: i for i, c in enumerate(classes)}
    values = dataset[task.label]
    keep = [i for i, v in enumerate(values) if v in index]
    subset = dataset.select(keep)
    labels = np.array([index[values[i]] for i in keep], dtype=np.int64)
    if "label" in subset.column_names:
        subset = subset.remove_columns("label")
    return subset.add_column("label", labels.tolist())


def prepare_task(train: datasets.Dataset, val: datasets.Dataset, task: TaskSpec) -> PreparedTask:
    """Select the task's cells, fix the class list from train, and filter rare classes.

    The class list is sorted (positive class last), so the id of each class is stable across
    runs and machines (Geneformer derives it from ``set()`` order, which is not). Every name of
    ``tasks.<name>.cell_types`` and ``positive_class`` must match train cells; the cells of the
    rare classes (below ``min_cells_per_class``) are a loss, checked against
    ``task.rare_class_limit`` (``losses.rare_class_cells``).

    Raises
    ------
    InputError
        When a name of the task matches nothing in train, when fewer than two classes remain,
        or when the rare classes hold more than ``rare_class_limit.stop`` of the train cells.
    """
    train_source = dataset_source(train, "the train split")
    val_source = dataset_source(val, "the val split")
    warnings: list[dict[str, Any]] = []
    train, train_other = select_cells(train, task, source=train_source, strict=True)
    val, val_other = select_cells(val, task, source=val_source, warnings=warnings)
    counts = pd.Series(train[task.label]).value_counts()
    if task.positive_class is not None:
        check_names(
            [task.positive_class],
            counts.index,
            key=f"tasks.{task.name}.positive_class",
            what="class",
            source=train_source,
            column=task.label,
        )
    rare = sorted(str(c) for c in counts.index[counts < task.min_cells_per_class])
    if task.positive_class in rare:
        msg = (
            f"params.yaml tasks.{task.name}.positive_class: {task.positive_class!r} has "
            f"{int(counts[task.positive_class])} cells in {train_source} ({task.label}), fewer "
            f"than tasks.{task.name}.min_cells_per_class = {task.min_cells_per_class}. Lower "
            "min_cells_per_class or sample more cells."
        )
        raise InputError(msg)
    classes = task.order_classes(counts.index[counts >= task.min_cells_per_class])
    if len(classes) < 2:
        msg = (
            f"task {task.name}: fewer than two classes with >= {task.min_cells_per_class} training "
            f"cells (counts: {counts.to_dict()}). Lower tasks.{task.name}.min_cells_per_class or "
            "sample more cells."
        )
        raise InputError(msg)
    n_train, n_val = len(train), len(val)
    n_rare = int(counts[counts < task.min_cells_per_class].sum())
    rare_check = None
    if task.rare_class_limit is not None:
        rare_check = check_loss(
            n_rare,
            n_train,
            what=f"train cells of task {task.name} in classes with fewer than "
            f"{task.min_cells_per_class} cells ({', '.join(rare) or 'none'})",
            key="rare_class_cells",
            limit=task.rare_class_limit,
            source=train_source,
            hint=f"Lower tasks.{task.name}.min_cells_per_class, or sample more cells",
        )
    train = encode_labels(train, task, classes)
    val = encode_labels(val, task, classes)
    val_classes = set(val[task.label])
    missing = [c for c in classes if c not in val_classes]
    if missing:
        logger.warning("task %s: val has no cell of class(es) %s", task.name, missing)
    report: dict[str, Any] = {
        "classes": classes,
        "rare_classes_dropped": rare,
        "train_cells": len(train),
        "val_cells": len(val),
        "train_cells_other_cell_types": train_other,
        "val_cells_other_cell_types": val_other,
        "train_cells_rare_class": n_train - len(train),
        "val_cells_rare_or_unseen_class": n_val - len(val),
        "train_cells_per_class": {c: int(counts.get(c, 0)) for c in classes},
    }
    if rare_check is not None:
        report["rare_class_cells"] = rare_check
    if warnings:
        report["warnings"] = warnings
    logger.info(
        "task %s: classes %s; %d train, %d val cells", task.name, classes, len(train), len(val)
    )
    return PreparedTask(train=train, val=val, classes=classes, report=report)


def patient_auroc(
    patient_ids: Sequence[str], labels: np.ndarray, prob_positive: np.ndarray
) -> float:
    """AUROC of the mean P(positive) per patient; NaN when val holds one class only."""
    frame = pd.DataFrame({"patient": patient_ids, "label": labels, "p": prob_positive})
    per_patient = frame.groupby("patient", sort=True).agg(label=("label", "first"), p=("p", "mean"))
    if per_patient["label"].nunique() < 2:
        return float("nan")
    return float(roc_auc_score(per_patient["label"], per_patient["p"]))


def check_task_metric(prepared: PreparedTask, task: TaskSpec) -> str:
    """The task's validation metric, after checking that ``val`` can define it."""
    metric = str(task.early_stopping_metric)
    if metric == "patient_auroc":
        if len(prepared.classes) != 2:
            msg = f"task {task.name}: patient_auroc needs two classes, got {prepared.classes}."
            raise InputError(msg)
        if len(set(prepared.val["label"])) < 2:
            msg = (
                f"task {task.name}: val lacks one of {prepared.classes}; patient AUROC is "
                "undefined."
            )
            raise InputError(msg)
    return metric
