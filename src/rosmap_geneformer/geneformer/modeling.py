"""The base model: Geneformer's BERT, pretrained here by masked-gene prediction or imported.

Two sources (``params.yaml: base_model.source``):

- ``pretrain``: a ``BertForMaskedLM`` with Geneformer's architecture (``geneformer-spec.md``
  section 3: ReLU, absolute positions, ``<pad>`` 0, two token types, LayerNorm eps 1e-12,
  initializer range 0.02), scaled down, pretrained on the tokenized train cells with
  Geneformer's objective (section 4): 15% of the gene tokens of a cell are chosen; of those 80%
  become ``<mask>``, 10% a random gene token and 10% stay; the loss is cross-entropy on the
  chosen positions only. Batches are grouped by length and padded on the right.
- ``checkpoint``: a local Geneformer checkpoint (e.g. Geneformer-V1-10M), validated against the
  token dictionary and the tokenizer settings, then re-saved.

Either way ``models/base/`` ends up with ``config.json``, ``model.safetensors`` and
``base_model.json`` (a summary), and the masked-gene loss and accuracy on the same held-out train
cells, with the same masks, are logged through dvclive, so that the two sources compare directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import SequentialSampler
from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments
from transformers.integrations import DVCLiveCallback

from rosmap_geneformer.geneformer.dictionaries import CLS, EOS, MASK, PAD, SPECIAL_TOKENS
from rosmap_geneformer.io import atomic_output

logger = logging.getLogger(__name__)

SOURCES = ("pretrain", "checkpoint")
SUMMARY_FILE = "base_model.json"
IGNORE_INDEX = -100
# Vocabulary sizes of Geneformer's released dictionaries, for the hints in error messages.
KNOWN_VOCABULARIES = {
    25_426: (
        "a V1 (gc30M, 25,426-token) checkpoint; set dictionaries.source: geneformer with the "
        "gc30M files (token_dictionary_gc30M.pkl, gene_median_dictionary_gc30M.pkl), "
        "tokenize.special_tokens: false and tokenize.model_input_size: 2048"
    ),
    20_275: (
        "a V2 (gc104M, 20,275-token) checkpoint; set dictionaries.source: geneformer with the "
        "gc104M files (token_dictionary_gc104M.pkl, gene_median_dictionary_gc104M.pkl), "
        "tokenize.special_tokens: true and tokenize.model_input_size: 4096"
    ),
}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# --------------------------------------------------------------------------------------------
# Device


@dataclass(frozen=True)
class DeviceSettings:
    """Where and how a model runs.

    Attributes
    ----------
    device
        ``"cuda"`` or ``"cpu"``.
    bf16
        Mixed precision in bfloat16 (CUDA with bf16 support only).
    attn_implementation
        Attention kernel for ``from_pretrained``/``from_config``; PyTorch's SDPA everywhere (on
        CPU too, where it uses a fused kernel when attention dropout is 0).
    """

    device: str
    bf16: bool
    attn_implementation: str = "sdpa"

    def training_arguments(self) -> dict[str, Any]:
        """The ``TrainingArguments`` keywords for this device (``use_cpu``, ``bf16``)."""
        return {"use_cpu": self.device == "cpu", "bf16": self.bf16}


def select_device(*, allow_cuda: bool = True) -> DeviceSettings:
    """CUDA with bf16 (when supported) and SDPA attention if a GPU is visible, else the CPU.

    Apple's MPS is not used: the CPU path is the deterministic reference.

    Parameters
    ----------
    allow_cuda
        Set to false to force the CPU.
    """
    if allow_cuda and torch.cuda.is_available():
        return DeviceSettings(device="cuda", bf16=bool(torch.cuda.is_bf16_supported()))
    return DeviceSettings(device="cpu", bf16=False)


# --------------------------------------------------------------------------------------------
# Configuration


def geneformer_bert_config(
    *,
    vocab_size: int,
    max_position_embeddings: int,
    num_hidden_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int,
    dropout: float,
    attention_dropout: float | None = None,
    pad_token_id: int = 0,
) -> BertConfig:
    """A ``BertConfig`` with Geneformer's architecture at the given size.

    Fixed as in every released Geneformer: ``hidden_act="relu"``, absolute position embeddings,
    ``type_vocab_size=2``, ``layer_norm_eps=1e-12``, ``initializer_range=0.02``.

    Parameters
    ----------
    vocab_size
        Number of tokens: ``len(token_dictionary)``.
    max_position_embeddings
        The tokenizer's ``model_input_size`` (Geneformer V1: 2048, V2: 4096).
    num_hidden_layers, hidden_size, num_attention_heads, intermediate_size
        Encoder size (Geneformer-V1-10M: 6, 256, 4, 512).
    dropout
        Dropout on hidden states (Geneformer V1: 0.02).
    attention_dropout
        Dropout on attention probabilities; ``None``: ``dropout``. 0 lets PyTorch use its fused
        attention kernel, about 3x faster on a CPU.
    pad_token_id
        The token id of ``<pad>`` (0 in Geneformer's dictionaries).
    """
    attention_dropout = dropout if attention_dropout is None else attention_dropout
    sizes = {
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "num_hidden_layers": num_hidden_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
    }
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        msg = f"base_model.architecture: sizes must be positive integers; got {bad}."
        raise ValueError(msg)
    if hidden_size % num_attention_heads:
        msg = (
            f"base_model.architecture: hidden_size {hidden_size} is not a multiple of "
            f"num_attention_heads {num_attention_heads}."
        )
        raise ValueError(msg)
    for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        if not 0 <= value < 1:
            msg = f"base_model.architecture: {name}={value!r} must be in [0, 1)."
            raise ValueError(msg)
    if not 0 <= pad_token_id < vocab_size:
        msg = f"pad_token_id {pad_token_id} is outside the vocabulary (size {vocab_size})."
        raise ValueError(msg)
    return BertConfig(
        **sizes,
        hidden_act="relu",
        hidden_dropout_prob=float(dropout),
        attention_probs_dropout_prob=float(attention_dropout),
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        initializer_range=0.02,
        pad_token_id=int(pad_token_id),
        position_embedding_type="absolute",
        architectures=["BertForMaskedLM"],
    )


ARCHITECTURE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "dropout",
    "attention_dropout",
)


def config_from_params(
    architecture: Mapping[str, Any], *, token_dictionary: Mapping[str, Any], model_input_size: int
) -> BertConfig:
    """:func:`geneformer_bert_config` from ``params.yaml: base_model.architecture``.

    The vocabulary is the token dictionary, the positions ``tokenize.model_input_size`` and the
    padding token the dictionary's ``<pad>``.
    """
    unknown = sorted(set(architecture) - set(ARCHITECTURE_KEYS))
    missing = sorted(set(ARCHITECTURE_KEYS) - set(architecture) - {"attention_dropout"})
    if unknown or missing:
        msg = (
            f"params.yaml: base_model.architecture has unknown key(s) {unknown} and lacks "
            f"{missing}; it takes {list(ARCHITECTURE_KEYS)} (attention_dropout optional)."
        )
        raise ValueError(msg)
    if PAD not in token_dictionary:
        msg = "token dictionary lacks '<pad>'."
        raise ValueError(msg)
    return geneformer_bert_config(
        vocab_size=len(token_dictionary),
        max_position_embeddings=int(model_input_size),
        pad_token_id=int(token_dictionary[PAD]),
        **architecture,
    )


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
                raise ValueError(msg)
        if not 0 < mlm_probability < 1:
            msg = f"mlm_probability={mlm_probability!r} must be in (0, 1)."
            raise ValueError(msg)
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
            raise ValueError(msg)
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
            raise ValueError(msg)
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
# Trainer


class GeneformerTrainer(Trainer):
    """``Trainer`` that evaluates in dataset order.

    With ``train_sampling_strategy="group_by_length"`` the stock ``Trainer`` also groups (and
    shuffles) the evaluation set by length; a sequential sampler keeps predictions in row order.
    """

    def _get_eval_sampler(self, eval_dataset: Any) -> torch.utils.data.Sampler | None:
        # Several processes: accelerate shards the rows in order and gathers them back in order.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


def _argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Keep only the predicted token per position: full logits would hold cells x length x vocab.
    return logits.argmax(dim=-1)


def _masked_accuracy(prediction: Any) -> dict[str, float]:
    predictions = np.asarray(prediction.predictions)
    labels = np.asarray(prediction.label_ids)
    chosen = labels != IGNORE_INDEX
    n = int(chosen.sum())
    return {
        "masked_accuracy": float((predictions[chosen] == labels[chosen]).sum() / n) if n else 0.0
    }


# --------------------------------------------------------------------------------------------
# Pretraining


@dataclass(kw_only=True)
class PretrainSettings:
    """Pretraining settings (``params.yaml: base_model.pretrain``).

    Parameters
    ----------
    epochs
        Passes over the pretraining cells.
    learning_rate
        Peak learning rate of the linear schedule (Geneformer V1: 1e-3).
    batch_size
        Cells per batch and device (Geneformer V1: 12).
    warmup_ratio
        Fraction of the steps with a linear warm-up.
    weight_decay
        AdamW weight decay (Geneformer V1: 0.001).
    mlm_probability
        Fraction of gene tokens chosen for prediction (0.15).
    max_cells
        Pretrain on at most this many train cells (a seeded random subset); ``None``: all.
    eval_fraction
        Fraction of those cells held out (seeded, by cell) to measure the masked-gene loss.
    eval_batch_size
        Cells per evaluation batch.
    logging_steps
        Log the training loss every this many steps.
    """

    epochs: float = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 12
    warmup_ratio: float = 0.1
    weight_decay: float = 0.001
    mlm_probability: float = 0.15
    max_cells: int | None = None
    eval_fraction: float = 0.05
    eval_batch_size: int = 32
    logging_steps: int = 10

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> PretrainSettings:
        """Build from ``params.yaml: base_model.pretrain``, refusing unknown keys and bad values."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            msg = (
                f"params.yaml: base_model.pretrain has unknown key(s) {unknown}; "
                f"known: {sorted(known)}."
            )
            raise ValueError(msg)
        settings = cls(**values)
        checks = {
            "epochs": settings.epochs > 0,
            "learning_rate": settings.learning_rate > 0,
            "batch_size": settings.batch_size >= 1,
            "warmup_ratio": 0 <= settings.warmup_ratio < 1,
            "weight_decay": settings.weight_decay >= 0,
            "mlm_probability": 0 < settings.mlm_probability < 1,
            "max_cells": settings.max_cells is None or settings.max_cells >= 2,
            "eval_fraction": 0 <= settings.eval_fraction < 1,
            "eval_batch_size": settings.eval_batch_size >= 1,
            "logging_steps": settings.logging_steps >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            msg = (
                f"params.yaml: base_model.pretrain.{bad[0]}={getattr(settings, bad[0])!r} "
                "is out of range."
            )
            raise ValueError(msg)
        return settings


def check_tokenized(
    dataset: datasets.Dataset,
    *,
    vocab_size: int,
    max_length: int,
    source: str | Path = "tokenized dataset",
) -> dict[str, int]:
    """Check a tokenized dataset against a vocabulary and a maximum length.

    Returns
    -------
    ``{"cells", "tokens", "min_length", "max_length"}``.

    Raises
    ------
    ValueError
        On missing columns, no cells, token ids outside ``[0, vocab_size)``, a ``length`` that is
        not the number of tokens, or a cell longer than ``max_length``.
    """
    import pyarrow.compute as pc

    missing = [c for c in ("input_ids", "length") if c not in dataset.column_names]
    if missing:
        msg = (
            f"{source}: lacks column(s) {missing} (has {dataset.column_names}); it must come from "
            "the tokenize stage."
        )
        raise ValueError(msg)
    if len(dataset) == 0:
        msg = f"{source}: holds no cell."
        raise ValueError(msg)
    # The selected rows as one Arrow table (zero-copy for an unselected, memory-mapped dataset).
    table = dataset.select_columns(["input_ids", "length"]).with_format("arrow")[:]
    ids = table.column("input_ids")
    n_tokens = pc.list_value_length(ids)
    length = table.column("length")
    if not pc.all(pc.equal(n_tokens, length)).as_py():
        msg = f"{source}: column 'length' differs from the number of input_ids in some cells."
        raise ValueError(msg)
    flat = pc.list_flatten(ids)
    lo, hi = pc.min_max(flat).values()
    if lo.as_py() is not None and (lo.as_py() < 0 or hi.as_py() >= vocab_size):
        msg = (
            f"{source}: token ids span [{lo.as_py()}, {hi.as_py()}] but the vocabulary has "
            f"{vocab_size} tokens. The dataset was tokenized with another dictionary; rerun the "
            "tokenize stage with models/dictionaries."
        )
        raise ValueError(msg)
    longest = int(pc.max(n_tokens).as_py())
    if longest > max_length:
        msg = (
            f"{source}: cells have up to {longest} tokens but the model takes at most "
            f"{max_length} (tokenize.model_input_size / max_position_embeddings); retokenize."
        )
        raise ValueError(msg)
    return {
        "cells": len(dataset),
        "tokens": len(flat),
        "min_length": int(pc.min(n_tokens).as_py()),
        "max_length": longest,
    }


def holdout_split(
    n_cells: int, *, max_cells: int | None, eval_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, sorted row indices of the pretraining and the held-out evaluation cells.

    At most ``max_cells`` cells are used (a random subset), and ``eval_fraction`` of those (at
    least one when the fraction is positive) are held out.
    """
    rng = np.random.default_rng(seed)
    used = np.arange(n_cells)
    if max_cells is not None and n_cells > max_cells:
        used = np.sort(rng.choice(n_cells, size=max_cells, replace=False))
    n_eval = max(1, round(eval_fraction * used.size)) if eval_fraction > 0 else 0
    if n_eval >= used.size:
        msg = f"eval_fraction {eval_fraction} leaves no pretraining cell out of {used.size}."
        raise ValueError(msg)
    order = rng.permutation(used.size)
    return np.sort(used[order[n_eval:]]), np.sort(used[order[:n_eval]])


def _training_arguments(
    settings: PretrainSettings,
    *,
    output_dir: Path,
    seed: int,
    device: DeviceSettings,
    has_eval: bool,
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        # A float below 1 is a fraction of the training steps.
        warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        eval_strategy="epoch" if has_eval else "no",
        logging_strategy="steps",
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **device.training_arguments(),
    )


@contextlib.contextmanager
def _scratch(path: str | Path | None) -> Iterator[Path]:
    """Trainer's working folder: ``path`` (a fixed name keeps the logged arguments the same
    from run to run) or a temporary folder; emptied afterwards either way."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="rosmap-pretrain-") as tmp:
            yield Path(tmp)
        return
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pretrain(
    train: datasets.Dataset,
    *,
    token_dictionary: Mapping[str, Any],
    config: BertConfig,
    settings: PretrainSettings,
    output_dir: str | Path,
    live_dir: str | Path | None,
    seed: int,
    source: str | Path = "train dataset",
    device: DeviceSettings | None = None,
    scratch_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Pretrain a ``BertForMaskedLM`` from scratch by masked-gene prediction.

    Holds out ``settings.eval_fraction`` of the (at most ``settings.max_cells``) cells, masks
    them once, and evaluates the loss and masked-token accuracy on them before training and
    after every epoch. Training uses ``Trainer`` with length-grouped batches, right padding and
    :class:`MaskedGeneCollator`. Metrics go to dvclive in ``live_dir``; the model
    (``config.json``, ``model.safetensors``) and ``base_model.json`` go to ``output_dir``. Both
    folders are written atomically.

    Parameters
    ----------
    train
        Tokenized train cells (``input_ids``, ``length``).
    token_dictionary
        The dictionary the cells were tokenized with.
    config
        Model configuration, e.g. from :func:`geneformer_bert_config`.
    settings
        Optimisation and data settings.
    output_dir
        Model folder (``models/base``).
    live_dir
        dvclive folder (``dvclive/base_model``); ``None``: no dvclive logging.
    seed
        Seeds weights, the cell subset, the hold-out, masks and batch order.
    source
        Names the dataset in messages.
    device
        Defaults to :func:`select_device`.

    Returns
    -------
    The summary written to ``base_model.json``.
    """
    from transformers import set_seed

    device = device or select_device()
    if config.vocab_size != len(token_dictionary):
        msg = (
            f"config vocab_size {config.vocab_size} differs from the token dictionary "
            f"({len(token_dictionary)} tokens)."
        )
        raise ValueError(msg)
    stats = check_tokenized(
        train,
        vocab_size=config.vocab_size,
        max_length=config.max_position_embeddings,
        source=source,
    )
    train_rows, eval_rows = holdout_split(
        len(train), max_cells=settings.max_cells, eval_fraction=settings.eval_fraction, seed=seed
    )
    columns = ["input_ids", "length"]
    train_ds = train.select(train_rows).select_columns(columns)
    collator = MaskedGeneCollator(
        token_dictionary,
        mlm_probability=settings.mlm_probability,
        seed=seed,
        # Tensor-core friendly shapes on GPUs; the exact longest length on the CPU.
        pad_to_multiple_of=8 if device.device == "cuda" else None,
    )
    eval_ds = (
        collator.premask(train.select(eval_rows).select_columns(columns), seed=seed + 1)
        if eval_rows.size
        else None
    )
    logger.info(
        "pretraining on %d cells, evaluating on %d held-out cells (of %d train cells)",
        len(train_rows),
        len(eval_rows),
        len(train),
    )

    set_seed(seed)
    model = BertForMaskedLM._from_config(config, attn_implementation=device.attn_implementation)
    n_parameters = model.num_parameters()
    logger.info("model: %s parameters, %s", f"{n_parameters:,}", _architecture(config))

    output_dir, live_dir = Path(output_dir), None if live_dir is None else Path(live_dir)
    with (
        atomic_output(output_dir) as model_tmp,
        _live_output(live_dir) as live_tmp,
        _scratch(scratch_dir) as scratch,
    ):
        args = _training_arguments(
            settings,
            output_dir=scratch,
            seed=seed,
            device=device,
            has_eval=eval_ds is not None,
        )
        callbacks = _live_callbacks(live_tmp)
        trainer = GeneformerTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=collator,
            compute_metrics=_masked_accuracy if eval_ds is not None else None,
            preprocess_logits_for_metrics=_argmax_logits if eval_ds is not None else None,
            callbacks=callbacks,
        )
        initial = trainer.evaluate() if eval_ds is not None else {}
        started = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - started
        history = trainer.state.log_history
        train_losses = [e["loss"] for e in history if "loss" in e]
        evals = [e for e in history if "eval_loss" in e]
        summary = {
            "source": "pretrain",
            "architecture": _architecture(config),
            "n_parameters": n_parameters,
            "settings": asdict(settings),
            "seed": seed,
            "device": asdict(device),
            "data": {
                **{f"input_{k}": v for k, v in stats.items()},
                "pretrain_cells": len(train_rows),
                "eval_cells": len(eval_rows),
                "unused_cells": len(train) - len(train_rows) - len(eval_rows),
            },
            "steps": int(trainer.state.global_step),
            "epochs": float(trainer.state.epoch or 0.0),
            "train_loss_mean": float(result.training_loss),
            "train_loss_final": float(train_losses[-1]) if train_losses else None,
            "eval_loss_initial": _maybe(initial, "eval_loss"),
            "eval_loss_final": _maybe(evals[-1], "eval_loss") if evals else None,
            "eval_masked_accuracy_initial": _maybe(initial, "eval_masked_accuracy"),
            "eval_masked_accuracy_final": _maybe(evals[-1], "eval_masked_accuracy")
            if evals
            else None,
            # No wall-clock time here: this file is DVC-cached data and must be the same bytes
            # on every run (dvclive's train/runtime keeps the time).
        }
        model_tmp.mkdir()
        _save(trainer.model, model_tmp, summary)
    logger.info(
        "pretrained in %.0f s: eval loss %s -> %s",
        train_seconds,
        summary["eval_loss_initial"],
        summary["eval_loss_final"],
    )
    return summary


def _maybe(metrics: Mapping[str, Any], key: str) -> float | None:
    return float(metrics[key]) if key in metrics else None


def _architecture(config: BertConfig) -> dict[str, Any]:
    keys = (
        "vocab_size",
        "max_position_embeddings",
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "intermediate_size",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "hidden_act",
        "pad_token_id",
    )
    return {k: getattr(config, k) for k in keys}


@contextlib.contextmanager
def _live_output(path: Path | None) -> Iterator[Path | None]:
    """``atomic_output`` for the dvclive folder, or nothing when there is none."""
    if path is None:
        yield None
        return
    with atomic_output(path) as tmp:
        yield tmp


def _live(path: Path) -> Any:
    from dvclive import Live

    # No dvc.yaml (dvc.yaml declares the metrics), no report, and no experiment commit when the
    # script runs outside `dvc exp run`.
    return Live(str(path), dvcyaml=None, report=None, save_dvc_exp=False)


def is_wall_clock(key: str) -> bool:
    """Whether a Trainer metric is a timing (``train_runtime``, ``eval_samples_per_second``,
    ``eval_model_preparation_time``, ...). Timings differ from run to run, so they stay out of
    every pipeline output: the same params must give the same bytes (Trainer still prints them)."""
    name = key.removeprefix("eval_").removeprefix("train_")
    return name in ("runtime", "model_preparation_time") or name.endswith("_per_second")


class LiveCallback(DVCLiveCallback):
    """transformers' ``DVCLiveCallback`` without Trainer's timings (:func:`is_wall_clock`), so
    that the dvclive logs, and what is drawn from them, are the same bytes on every run."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        logs = {k: v for k, v in (logs or {}).items() if not is_wall_clock(k)}
        super().on_log(args, state, control, logs=logs, **kwargs)


def _live_callbacks(path: Path | None) -> list[Any]:
    if path is None:
        return []
    return [LiveCallback(live=_live(path), log_model=False)]


def _save(model: BertForMaskedLM, directory: Path, summary: Mapping[str, Any]) -> None:
    """``save_pretrained`` (config.json, model.safetensors) plus the summary; nothing else."""
    # Trainer switches use_cache off for training; keep the config as built (Geneformer: true).
    model.config.use_cache = True
    model.save_pretrained(str(directory))
    for path in directory.iterdir():
        # save_pretrained writes through a private temp file (mode 0600)
        path.chmod(0o644)
    (directory / SUMMARY_FILE).write_text(
        json.dumps(summary, indent=2, default=_json_default, allow_nan=False) + "\n"
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Path):
        return obj.as_posix()
    msg = f"cannot write {type(obj).__name__} to JSON"
    raise TypeError(msg)


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
        _live_output(live_dir) as live_tmp,
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
        callbacks = _live_callbacks(live_tmp)
        trainer = GeneformerTrainer(
            model=model,
            args=args,
            eval_dataset=eval_ds,
            data_collator=collator,
            compute_metrics=_masked_accuracy,
            preprocess_logits_for_metrics=_argmax_logits,
            callbacks=callbacks,
        )
        metrics = trainer.evaluate()
        if callbacks:
            callbacks[0].live.end()
    return {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# Checkpoints


def _hint(vocab_size: int) -> str:
    known = KNOWN_VOCABULARIES.get(vocab_size)
    if known:
        return f"This is {known}; then rerun `dvc repro`."
    return (
        "Use the token dictionary the checkpoint was trained with (dictionaries.source: "
        "geneformer with its files) and retokenize (`dvc repro`)."
    )


def validate_checkpoint(
    path: str | Path,
    *,
    token_dictionary: Mapping[str, Any],
    model_input_size: int,
    special_tokens: bool,
    dictionary_source: str = "models/dictionaries/token_dictionary.pkl",
) -> BertConfig:
    """Check that a local Geneformer checkpoint fits the dictionary and the tokenizer settings.

    Nothing is downloaded: ``path`` must be an existing local folder with ``config.json`` and
    weights (``model.safetensors`` or ``pytorch_model.bin``, possibly sharded).

    Parameters
    ----------
    path
        The checkpoint folder (e.g. ``Geneformer-V1-10M``).
    token_dictionary
        The pipeline's token dictionary (``models/dictionaries/token_dictionary.pkl``).
    model_input_size
        ``tokenize.model_input_size``.
    special_tokens
        ``tokenize.special_tokens``.
    dictionary_source
        Names the dictionary in messages.

    Returns
    -------
    The checkpoint's configuration.

    Raises
    ------
    FileNotFoundError
        When ``path`` is not a local folder, or lacks ``config.json`` or weights.
    ValueError
        Naming the checkpoint, the config key, both values and the fix, when the model type is
        not BERT, ``vocab_size`` differs from the dictionary size, ``max_position_embeddings``
        is below ``model_input_size``, ``pad_token_id`` is not the dictionary's ``<pad>``, the
        position embeddings are not absolute, or special tokens are on and the dictionary lacks
        ``<cls>``/``<eos>``.
    """
    path = Path(path)
    if not path.is_dir():
        msg = (
            f"{path}: base_model.checkpoint is not a local folder. The pipeline never downloads "
            "models (no hub ids): download the checkpoint yourself (e.g. the Geneformer-V1-10M "
            "folder of huggingface.co/ctheodoris/Geneformer), `dvc add` it, and set "
            "base_model.checkpoint to that folder."
        )
        raise FileNotFoundError(msg)
    config_path = path / "config.json"
    if not config_path.is_file():
        msg = f"{path}: no config.json; a checkpoint folder holds config.json and the weights."
        raise FileNotFoundError(msg)
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        msg = (
            f"{path}: no weights ({', '.join(_WEIGHT_FILES)}). Are they Git LFS pointers or "
            "missing from the download?"
        )
        raise FileNotFoundError(msg)
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        msg = f"{config_path}: not valid JSON ({err})."
        raise ValueError(msg) from err
    where = f"{config_path}"
    if raw.get("model_type") != "bert":
        msg = (
            f"{where}: model_type is {raw.get('model_type')!r}, expected 'bert'. Geneformer "
            "checkpoints are BERT models; point base_model.checkpoint at one."
        )
        raise ValueError(msg)
    config = BertConfig.from_dict(raw)
    n_tokens = len(token_dictionary)
    if config.vocab_size != n_tokens:
        msg = (
            f"{where}: vocab_size is {config.vocab_size} but {dictionary_source} has "
            f"{n_tokens:,} tokens, so token ids would mean different genes. {_hint(config.vocab_size)}"
        )
        raise ValueError(msg)
    if config.max_position_embeddings < model_input_size:
        msg = (
            f"{where}: max_position_embeddings is {config.max_position_embeddings} but "
            f"tokenize.model_input_size is {model_input_size}; the model cannot read cells that "
            f"long. Set tokenize.model_input_size: {config.max_position_embeddings} and rerun "
            "`dvc repro`."
        )
        raise ValueError(msg)
    pad = token_dictionary.get(PAD)
    if config.pad_token_id is None or pad is None or int(config.pad_token_id) != int(pad):
        msg = (
            f"{where}: pad_token_id is {config.pad_token_id!r} but {dictionary_source} maps "
            f"<pad> to {pad!r}. Use the dictionary the checkpoint was trained with (Geneformer: "
            "<pad> = 0)."
        )
        raise ValueError(msg)
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        msg = (
            f"{where}: position_embedding_type is {position!r}, expected 'absolute' "
            "(Geneformer's; transformers' BERT supports no other)."
        )
        raise ValueError(msg)
    has_specials = CLS in token_dictionary and EOS in token_dictionary
    if special_tokens and not has_specials:
        msg = (
            f"{path}: tokenize.special_tokens is true but {dictionary_source} has no "
            f"<cls>/<eos> (a V1 dictionary). Set tokenize.special_tokens: false for V1 "
            "checkpoints, or use a V2 checkpoint with the gc104M dictionary."
        )
        raise ValueError(msg)
    if has_specials and not special_tokens:
        logger.warning(
            "%s: the dictionary has <cls>/<eos> (V2) but tokenize.special_tokens is false; "
            "V2 models were trained on cells framed by <cls> ... <eos> (Geneformer warns too)",
            path,
        )
    return config


def import_checkpoint(
    path: str | Path,
    *,
    output_dir: str | Path,
    token_dictionary: Mapping[str, Any],
    model_input_size: int,
    special_tokens: bool,
    train: datasets.Dataset | None = None,
    settings: PretrainSettings | None = None,
    live_dir: str | Path | None = None,
    seed: int = 0,
    dictionary_source: str = "models/dictionaries/token_dictionary.pkl",
    device: DeviceSettings | None = None,
) -> dict[str, Any]:
    """Validate a local Geneformer checkpoint and save it as the base model.

    The weights are loaded into ``BertForMaskedLM`` (missing encoder weights are an error, a
    missing masked-LM head a warning) and saved with ``save_pretrained``, so ``output_dir``
    always holds ``config.json`` + ``model.safetensors``. When ``train`` is given, the
    masked-gene loss of the checkpoint is measured on the same held-out cells, with the same
    masks, as :func:`pretrain` would use, and logged to ``live_dir``.

    Returns
    -------
    The summary written to ``base_model.json``.
    """
    path = Path(path)
    device = device or select_device()
    config = validate_checkpoint(
        path,
        token_dictionary=token_dictionary,
        model_input_size=model_input_size,
        special_tokens=special_tokens,
        dictionary_source=dictionary_source,
    )
    model, info = BertForMaskedLM.from_pretrained(
        str(path),
        local_files_only=True,
        output_loading_info=True,
        attn_implementation=device.attn_implementation,
        dtype=torch.float32,
    )
    missing = list(info.get("missing_keys", []))
    encoder_missing = [k for k in missing if not k.startswith("cls.")]
    if encoder_missing:
        msg = (
            f"{path}: the weights lack {len(encoder_missing)} encoder tensor(s), e.g. "
            f"{sorted(encoder_missing)[:5]}; is this a Geneformer BERT checkpoint?"
        )
        raise ValueError(msg)
    if missing:
        logger.warning(
            "%s: no masked-LM head weights (%d tensors, e.g. %s); they are newly initialised "
            "(fine for fine-tuning; masked-gene loss and in silico perturbation need the head)",
            path,
            len(missing),
            sorted(missing)[:3],
        )
    unexpected = list(info.get("unexpected_keys", []))
    if unexpected:
        logger.info("%s: ignored %d tensors not in BertForMaskedLM", path, len(unexpected))
    summary: dict[str, Any] = {
        "source": "checkpoint",
        "checkpoint": path.as_posix(),
        "architecture": _architecture(config),
        "n_parameters": model.num_parameters(),
        "missing_head_tensors": len(missing),
        "ignored_tensors": len(unexpected),
    }
    live_dir = None if live_dir is None else Path(live_dir)
    eval_rows = np.zeros(0, dtype=np.int64)
    if train is not None:
        settings = settings or PretrainSettings()
        check_tokenized(
            train, vocab_size=config.vocab_size, max_length=model_input_size, source="train"
        )
        _, eval_rows = holdout_split(
            len(train),
            max_cells=settings.max_cells,
            eval_fraction=settings.eval_fraction,
            seed=seed,
        )
    if train is not None and settings is not None and eval_rows.size:
        metrics = evaluate_masked_genes(
            model,
            train.select(eval_rows),
            token_dictionary=token_dictionary,
            mlm_probability=settings.mlm_probability,
            # seed + 1: the masks pretrain() uses for its held-out cells
            seed=seed + 1,
            batch_size=settings.eval_batch_size,
            live_dir=live_dir,
            device=device,
        )
        summary["eval_cells"] = int(eval_rows.size)
        summary["eval_loss_final"] = metrics.get("eval_loss")
        summary["eval_masked_accuracy_final"] = metrics.get("eval_masked_accuracy")
    elif live_dir is not None:
        # dvc.yaml declares the dvclive metrics and plots: write them even without evaluation.
        with _live_output(live_dir) as live_tmp:
            live = _live(live_tmp)
            live.log_params({"source": "checkpoint", "checkpoint": path.as_posix()})
            live.log_metric("n_parameters", summary["n_parameters"])
            live.end()
    with atomic_output(output_dir) as tmp:
        tmp.mkdir()
        _save(model, tmp, summary)
    logger.info("imported %s (%s parameters)", path, f"{summary['n_parameters']:,}")
    return summary


__all__ = [
    "SOURCES",
    "SUMMARY_FILE",
    "DeviceSettings",
    "GeneformerTrainer",
    "LiveCallback",
    "MaskedGeneCollator",
    "PretrainSettings",
    "check_tokenized",
    "config_from_params",
    "evaluate_masked_genes",
    "geneformer_bert_config",
    "holdout_split",
    "import_checkpoint",
    "is_wall_clock",
    "pretrain",
    "select_device",
    "validate_checkpoint",
]
