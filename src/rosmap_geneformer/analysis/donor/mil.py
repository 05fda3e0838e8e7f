"""Gated-attention multiple-instance learning over a donor's cell embeddings (Ilse et al. 2018).

A donor is a bag of cells. ``torchmil``'s :class:`~torchmil.models.ABMIL` with ``gated=True``
weighs each cell (softmax attention within the bag), pools the weighted embeddings and classifies
the donor; ``torchmil``'s :class:`~torchmil.utils.trainer.Trainer` runs the epochs. The attention
of each cell is kept, so the report can say which cells and cell types the model read.

Choices:
- Embeddings are standardised with the training donors' cells' mean and sd (a fold never sees its
  held-out donors' statistics).
- A bag holds at most ``max_cells_per_donor`` cells (a seeded subset; the stage subsets the
  cells before embedding them, ``donor.max_cells_per_donor``), which bounds memory and keeps one
  large donor from outweighing the rest.
- A fixed number of epochs, no early stopping: with a few dozen donors, a validation split would
  be too small to stop on, and the final weights are used.
- Everything random (initial weights, batch order, subsets) is seeded per fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class MILSettings:
    """``params.yaml: donor.mil``."""

    att_dim: int = 64
    epochs: int = 40
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    max_cells_per_donor: int | None = 500


def bag_rows(
    donors: np.ndarray, wanted: Sequence[str], *, max_cells: int | None, seed: int
) -> list[np.ndarray]:
    """Row numbers of each wanted donor's cells (sorted), at most ``max_cells`` (seeded subset)."""
    rng = np.random.default_rng(seed)
    by_donor = pd.Series(np.arange(len(donors))).groupby(donors).indices
    bags = []
    for donor in wanted:
        rows = np.asarray(by_donor.get(donor, np.array([], dtype=np.int64)), dtype=np.int64)
        if max_cells is not None and rows.size > max_cells:
            rows = np.sort(rng.choice(rows, size=max_cells, replace=False))
        bags.append(rows)
    return bags


@dataclass
class AttentionMIL:
    """Gated ABMIL on one model's cell embeddings (see the module docstring).

    Attributes
    ----------
    embeddings
        Cells x dimensions.
    cells
        One row per cell (same order): ``cell_id``, ``patient_id``, ``cell_type``.
    """

    name: str
    description: str
    embeddings: np.ndarray
    cells: pd.DataFrame
    settings: MILSettings
    cross_validated: bool = True

    def _bags(
        self, donors: Sequence[str], mean: np.ndarray, sd: np.ndarray, seed: int
    ) -> tuple[list[np.ndarray], list[torch.Tensor]]:
        rows = bag_rows(
            self.cells["patient_id"].to_numpy(),
            donors,
            max_cells=self.settings.max_cells_per_donor,
            seed=seed,
        )
        tensors = [
            torch.from_numpy(((self.embeddings[r] - mean) / sd).astype(np.float32)) for r in rows
        ]
        return rows, tensors

    def fit_score(
        self, train: Sequence[str], labels: np.ndarray, score: Sequence[str], *, seed: int
    ) -> Any:
        from tensordict import TensorDict
        from torchmetrics import AUROC
        from torchmil.data import collate_fn
        from torchmil.models import ABMIL
        from torchmil.utils.trainer import Trainer

        from rosmap_geneformer.analysis.donor.methods import Scored

        s = self.settings
        train_rows = np.flatnonzero(np.isin(self.cells["patient_id"].to_numpy(), list(train)))
        mean = self.embeddings[train_rows].mean(axis=0)
        sd = self.embeddings[train_rows].std(axis=0)
        sd[sd == 0] = 1.0
        _, train_bags = self._bags(train, mean, sd, seed)
        # A donor without tokenized cells has no bag: it trains nothing and scores NaN (the
        # cross-validation gives it the prior, and counts it).
        examples = [
            {"X": x, "Y": torch.tensor(float(y))}
            for x, y in zip(train_bags, labels, strict=True)
            if x.shape[0]
        ]
        labels = np.array([y for x, y in zip(train_bags, labels, strict=True) if x.shape[0]])
        torch.manual_seed(seed)
        n_pos = max(1, int(labels.sum()))
        model = ABMIL(
            in_shape=(self.embeddings.shape[1],),
            att_dim=s.att_dim,
            gated=True,
            criterion=torch.nn.BCEWithLogitsLoss(
                pos_weight=torch.tensor((len(labels) - n_pos) / n_pos)
            ),
        )
        loader = torch.utils.data.DataLoader(
            examples,
            batch_size=s.batch_size,
            shuffle=True,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )
        trainer = Trainer(
            model,
            torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay),
            metrics_dict={"auroc": AUROC(task="binary")},
            obj_metric="auroc",
            device="cpu",
            disable_pbar=True,
            verbose=False,
        )
        # The trainer wants a validation loader; the training bags serve, and the final weights
        # are used (not the trainer's "best" epoch, which would be chosen on training donors).
        trainer.train(max_epochs=s.epochs, train_dataloader=loader, val_dataloader=loader)
        model = trainer.model.model
        model.eval()

        score_rows, score_bags = self._bags(score, mean, sd, seed + 1)
        scores = np.full(len(score), np.nan)
        frames = []
        with torch.inference_mode():
            for i, (rows, x) in enumerate(zip(score_rows, score_bags, strict=True)):
                if not x.shape[0]:
                    continue
                batch = TensorDict({"X": x[None], "mask": torch.ones(1, x.shape[0])})
                logit, attention = model(batch["X"], batch["mask"], return_att=True)
                scores[i] = float(torch.sigmoid(logit)[0])
                weights = torch.softmax(attention[0], dim=0).numpy().astype(np.float64)
                frame = self.cells.iloc[rows][["cell_id", "patient_id", "cell_type"]].copy()
                frame["attention"] = weights
                frames.append(frame)
        cells = (
            pd.concat(frames, ignore_index=True)
            if frames
            else pd.DataFrame(columns=["cell_id", "patient_id", "cell_type", "attention"])
        )
        return Scored(scores=scores, cells=cells)


def attention_by_cell_type(cells: pd.DataFrame) -> pd.DataFrame:
    """Per cell type, averaged over donors: its share of cells, its share of attention, and their
    ratio (``enrichment`` > 1: the model reads this cell type more than its numbers)."""
    per_donor = cells.groupby(["patient_id", "cell_type"], sort=True).agg(
        attention=("attention", "sum"), n=("attention", "size")
    )
    totals = per_donor.groupby(level="patient_id")["n"].transform("sum")
    per_donor["cell_share"] = per_donor["n"] / totals
    table = per_donor.unstack("cell_type").fillna(0.0)
    out = pd.DataFrame(
        {
            "cell_share": table["cell_share"].mean(axis=0),
            "attention_share": table["attention"].mean(axis=0),
        }
    )
    out["enrichment"] = out["attention_share"] / out["cell_share"].where(out["cell_share"] > 0)
    out.index.name = "cell_type"
    return out.reset_index().sort_values("enrichment", ascending=False, kind="stable")
