"""Masked-gene prediction, Geneformer's pretraining objective (``geneformer-spec.md`` section 4).

15% of the gene tokens of a cell are chosen; of those 80% become ``<mask>``, 10% a random gene
token and 10% stay; the loss is cross-entropy on the chosen positions only.
:class:`MaskedGeneCollator` pads and masks batches (or masks an evaluation set once);
:func:`evaluate_masked_genes` measures a model's masked-gene loss and accuracy.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import BertForMaskedLM, TrainingArguments

from rosmap_geneformer.errors import InputError
from rosmap_geneformer.geneformer.dictionaries import MASK, PAD, SPECIAL_TOKENS
from rosmap_geneformer.geneformer.model import DeviceSettings
from rosmap_geneformer.training.trainer import GeneformerTrainer, live_callbacks, live_output

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Masked-gene collator


class MaskedGeneCollator:
    """Pad cells on the right and mask genes for masked-gene prediction (BERT's 80/10/10).

    Each gene token is chosen with probability ``mlm_probability``; ``<pad>``, ``<mask>``,
    ``<cls>`` and ``<eos>`` never are. A chosen token becomes ``<mask>`` (80%), a random gene
    token (10%; never a special token) or stays (10%). ``labels`` hold the original token at the
    chosen positions and -100 elsewhere. A batch in which no token was chosen gets one chosen
    position, so its loss is defined.

    Features that already carry ``labels`` (a pre-masked evaluation set, see
    :meth:`premask`) are only padded. Random draws come from ``numpy.random.default_rng`` seeded
    with ``seed`` (per DataLoader worker: ``[seed, worker id]``), so the same seed and the same
    batch order give the same masks.

    Parameters
    ----------
    token_dictionary
        Token dictionary (``<pad>``, ``<mask>`` and genes; ``<cls>``/``<eos>`` in V2).
    mlm_probability
        Fraction of gene tokens chosen (Geneformer: 0.15).
    seed
        Seed of the masking draws.
    pad_to_multiple_of
        Round the padded length up to a multiple of this (e.g. 8 on GPUs).
    """

    def __init__(
        self,
        token_dictionary: Mapping[str, Any],
        *,
        mlm_probability: float = 0.15,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        for token in (PAD, MASK):
            if token not in token_dictionary:
                msg = f"token dictionary lacks {token!r}; masked-gene prediction needs it."
                raise InputError(msg)
        if not 0 < mlm_probability < 1:
            msg = f"mlm_probability={mlm_probability!r} must be in (0, 1)."
            raise InputError(msg)
        self.pad_token_id = int(token_dictionary[PAD])
        self.mask_token_id = int(token_dictionary[MASK])
        self.special_token_ids = np.array(
            sorted(int(v) for k, v in token_dictionary.items() if k in SPECIAL_TOKENS),
            dtype=np.int64,
        )
        self.gene_token_ids = np.array(
            sorted(int(v) for k, v in token_dictionary.items() if k not in SPECIAL_TOKENS),
            dtype=np.int64,
        )
        if self.gene_token_ids.size == 0:
            msg = "token dictionary holds no gene token."
            raise InputError(msg)
        self.vocab_size = len(token_dictionary)
        self.mlm_probability = float(mlm_probability)
        self.seed = int(seed)
        self.pad_to_multiple_of = pad_to_multiple_of
        self._rng = np.random.default_rng(self.seed)
        self._worker: int | None = None

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker != info.id:
            # Each DataLoader worker holds a copy of the collator: give each its own stream.
            self._worker = info.id
            self._rng = np.random.default_rng([self.seed, info.id])
        return self._rng

    def pad(self, sequences: Sequence[Sequence[int]], *, value: int) -> np.ndarray:
        """Right-pad ``sequences`` with ``value`` into an int64 matrix."""
        longest = max((len(s) for s in sequences), default=0)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = np.full((len(sequences), longest), value, dtype=np.int64)
        for row, seq in enumerate(sequences):
            out[row, : len(seq)] = np.asarray(seq, dtype=np.int64)
        return out

    def mask(
        self, input_ids: np.ndarray, *, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mask a padded batch.

        Parameters
        ----------
        input_ids
            ``(cells, positions)`` token ids, right-padded with ``<pad>``.
        rng
            Generator of the draws; the collator's own stream by default.

        Returns
        -------
        ``(masked_input_ids, labels)``, both int64 of the input's shape.
        """
        rng = self._generator() if rng is None else rng
        input_ids = np.asarray(input_ids, dtype=np.int64)
        candidates = ~np.isin(input_ids, self.special_token_ids)
        chosen = candidates & (rng.random(input_ids.shape) < self.mlm_probability)
        if candidates.any() and not chosen.any():
            flat = np.flatnonzero(candidates)
            chosen.flat[flat[rng.integers(flat.size)]] = True
        labels = np.where(chosen, input_ids, IGNORE_INDEX)
        draw = rng.random(input_ids.shape)
        to_mask = chosen & (draw < 0.8)
        to_random = chosen & (draw >= 0.8) & (draw < 0.9)
        masked = input_ids.copy()
        masked[to_mask] = self.mask_token_id
        masked[to_random] = self.gene_token_ids[
            rng.integers(self.gene_token_ids.size, size=int(to_random.sum()))
        ]
        return masked, labels

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``features`` (dicts with ``input_ids``, optionally ``labels``) into a batch."""
        sequences = [f["input_ids"] for f in features]
        input_ids = self.pad(sequences, value=self.pad_token_id)
        lengths = np.array([len(s) for s in sequences])
        attention_mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(
            np.int64
        )
        with_labels = ["labels" in f for f in features]
        if all(with_labels):
            labels = self.pad([f["labels"] for f in features], value=IGNORE_INDEX)
        elif any(with_labels):
            msg = "a batch mixes pre-masked cells (with labels) and cells without labels."
            raise InputError(msg)
        else:
            input_ids, labels = self.mask(input_ids)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }

    def premask(self, dataset: datasets.Dataset, *, seed: int) -> datasets.Dataset:
        """Mask every cell of ``dataset`` once, with its own seed, for a fixed evaluation set.

        Returns
        -------
        A dataset with ``input_ids`` (masked), ``labels`` and ``length``; the loss on it is
        comparable between epochs and between runs.
        """
        rng = np.random.default_rng(seed)
        masked, labels = [], []
        for ids in dataset["input_ids"]:
            row_ids, row_labels = self.mask(np.asarray(ids, dtype=np.int64)[None, :], rng=rng)
            masked.append(row_ids[0].tolist())
            labels.append(row_labels[0].tolist())
        return datasets.Dataset.from_dict(
            {"input_ids": masked, "labels": labels, "length": [len(m) for m in masked]}
        )


# --------------------------------------------------------------------------------------------
# Metrics at the chosen positions


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Trainer's ``preprocess_logits_for_metrics``: the predicted token at every position."""
    # Keep only the predicted token per position: full logits would hold cells x length x vocab.
    return logits.argmax(dim=-1)


def masked_accuracy(prediction: Any) -> dict[str, float]:
    """Trainer's ``compute_metrics``: the fraction of chosen positions predicted right."""
    predictions = np.asarray(prediction.predictions)
    labels = np.asarray(prediction.label_ids)
    chosen = labels != IGNORE_INDEX
    n = int(chosen.sum())
    return {
        "masked_accuracy": float((predictions[chosen] == labels[chosen]).sum() / n) if n else 0.0
    }


# --------------------------------------------------------------------------------------------
# Evaluation of a model's masked-gene loss (used for imported checkpoints)


def evaluate_masked_genes(
    model: BertForMaskedLM,
    dataset: datasets.Dataset,
    *,
    token_dictionary: Mapping[str, Any],
    mlm_probability: float,
    seed: int,
    batch_size: int,
    live_dir: Path | None,
    device: DeviceSettings,
) -> dict[str, float]:
    """Masked-gene loss and accuracy of ``model`` on ``dataset`` (masked once with ``seed``)."""
    collator = MaskedGeneCollator(token_dictionary, mlm_probability=mlm_probability, seed=seed)
    eval_ds = collator.premask(dataset.select_columns(["input_ids", "length"]), seed=seed)
    with (
        live_output(live_dir) as live_tmp,
        tempfile.TemporaryDirectory(prefix="rosmap-eval-") as scratch,
    ):
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            seed=seed,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            **device.training_arguments(),
        )
        callbacks = live_callbacks(live_tmp)
        trainer = GeneformerTrainer(
            model=model,
            args=args,
            eval_dataset=eval_ds,
            data_collator=collator,
            compute_metrics=masked_accuracy,
            preprocess_logits_for_metrics=argmax_logits,
            callbacks=callbacks,
        )
        metrics = trainer.evaluate()
        if callbacks:
            callbacks[0].live.end()
    return {k: float(v) for k, v in metrics.items()}


__all__ = [
    "IGNORE_INDEX",
    "MaskedGeneCollator",
    "argmax_logits",
    "evaluate_masked_genes",
    "masked_accuracy",
]
