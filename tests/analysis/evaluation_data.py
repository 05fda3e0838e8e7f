"""Synthetic predictions shared by the tests of :mod:`rosmap_geneformer.analysis.evaluation`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.analysis.evaluation.evaluate import Evaluation, evaluate_predictions

CELL_TYPES = ["Exc", "Inh", "Ast", "Vas/Immune"]
DISEASE = ["control", "AD"]


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def cell_type_data(n_cells: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CELL_TYPES), n_cells)
    logits = rng.normal(0.0, 1.0, (n_cells, len(CELL_TYPES)))
    logits[np.arange(n_cells), y] += 1.2
    return y, softmax(logits)


def disease_data(
    n_patients: int, *, cells: int = 20, effect: float = 0.15, seed: int = 0
) -> dict[str, np.ndarray]:
    """Patients alternate control/AD; AD cells get a higher P(AD) on average."""
    rng = np.random.default_rng(seed)
    patient_label = np.arange(n_patients) % 2
    patients = np.repeat([f"P{i:03d}" for i in range(n_patients)], cells)
    y = np.repeat(patient_label, cells)
    shift = np.repeat(rng.normal(0.0, 0.1, n_patients), cells)  # a donor effect
    p_ad = np.clip(0.45 + effect * y + shift + rng.normal(0.0, 0.2, len(y)), 0.0, 1.0)
    return {
        "cell_ids": np.array([f"c{i:05d}" for i in range(len(y))]),
        "patient_ids": patients,
        "y": y,
        "probs": np.column_stack([1.0 - p_ad, p_ad]),
    }


def evaluate_disease(data: dict[str, np.ndarray], **options: Any) -> Evaluation:
    """``evaluate_predictions`` of ``disease_data`` output as the disease task."""
    return evaluate_predictions(
        data["cell_ids"],
        data["patient_ids"],
        data["y"],
        data["probs"],
        classes=DISEASE,
        task_kind="disease",
        **options,
    )


def patients_frame(labels: list[int], scores: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": [f"P{i}" for i in range(len(labels))],
            "label": labels,
            "n_cells": 10,
            "mean_p_positive": scores,
            "frac_pred_positive": 0.0,
        }
    )
