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
from typing import Any

import datasets
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

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
    """

    name: str
    label: str
    cell_types: list[str] | None = None
    min_cells_per_class: int = 1
    patient_level: bool = False
    positive_class: str | None = None
    early_stopping_metric: str | None = None

    def __post_init__(self) -> None:
        if self.early_stopping_metric is None:
            self.early_stopping_metric = "patient_auroc" if self.patient_level else "macro_f1"
        if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
            msg = (
                f"params.yaml: tasks.{self.name}.early_stopping_metric="
                f"{self.early_stopping_metric!r}; use one of {EARLY_STOPPING_METRICS}."
            )
            raise ValueError(msg)
        if self.early_stopping_metric == "patient_auroc" and not self.patient_level:
            msg = f"params.yaml: tasks.{self.name}: patient_auroc needs patient_level: true."
            raise ValueError(msg)

    @classmethod
    def from_params(cls, name: str, spec: Mapping[str, Any]) -> TaskSpec:
        """Build from ``params.yaml: tasks.<name>``, refusing unknown keys."""
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = sorted(set(spec) - known)
        if unknown:
            msg = f"params.yaml: tasks.{name} has unknown key(s) {unknown}; known: {sorted(known)}."
            raise ValueError(msg)
        return cls(name=name, **spec)

    def order_classes(self, present: Sequence[str]) -> list[str]:
        """Sorted class names, with ``positive_class`` moved last (id 1 in a binary task)."""
        classes = sorted(str(c) for c in present)
        if self.positive_class is not None:
            if self.positive_class not in classes:
                msg = (
                    f"task {self.name}: positive_class {self.positive_class!r} is not among the "
                    f"training classes {classes}."
                )
                raise ValueError(msg)
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


def select_cells(
    dataset: datasets.Dataset, task: TaskSpec, *, source: str
) -> tuple[datasets.Dataset, int]:
    """Cells of the task's cell types; returns the subset and how many were left out."""
    for column in (task.label, "cell_type", "patient_id"):
        if column not in dataset.column_names:
            msg = (
                f"{source}: the tokenized dataset lacks column {column!r} (has "
                f"{dataset.column_names}); rerun the tokenize stage with it in tokenize.columns."
            )
            raise ValueError(msg)
    if not task.cell_types:
        return dataset, 0
    wanted = set(task.cell_types)
    keep = [i for i, t in enumerate(dataset["cell_type"]) if t in wanted]
    if not keep:
        present = sorted(set(dataset["cell_type"]))
        msg = f"{source}: no cell of types {sorted(wanted)} (tasks.{task.name}.cell_types); present: {present}."
        raise ValueError(msg)
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
    runs and machines (Geneformer derives it from ``set()`` order, which is not).
    """
    train, train_other = select_cells(train, task, source="train")
    val, val_other = select_cells(val, task, source="val")
    counts = pd.Series(train[task.label]).value_counts()
    rare = sorted(str(c) for c in counts.index[counts < task.min_cells_per_class])
    classes = task.order_classes(counts.index[counts >= task.min_cells_per_class])
    if len(classes) < 2:
        msg = (
            f"task {task.name}: fewer than two classes with >= {task.min_cells_per_class} training "
            f"cells (counts: {counts.to_dict()}). Lower tasks.{task.name}.min_cells_per_class or "
            "sample more cells."
        )
        raise ValueError(msg)
    n_train, n_val = len(train), len(val)
    train = encode_labels(train, task, classes)
    val = encode_labels(val, task, classes)
    val_classes = set(val[task.label])
    missing = [c for c in classes if c not in val_classes]
    if missing:
        logger.warning("task %s: val has no cell of class(es) %s", task.name, missing)
    report = {
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
            raise ValueError(msg)
        if len(set(prepared.val["label"])) < 2:
            msg = (
                f"task {task.name}: val lacks one of {prepared.classes}; patient AUROC is "
                "undefined."
            )
            raise ValueError(msg)
    return metric
