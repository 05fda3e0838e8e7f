"""The base model: Geneformer's BERT, pretrained here by masked-gene prediction or imported.

Two sources (``params.yaml: base_model.source``):

- ``pretrain``: a ``BertForMaskedLM`` with Geneformer's architecture
  (:func:`rosmap_geneformer.geneformer.model.geneformer_bert_config`), scaled down, pretrained
  on the tokenized train cells with Geneformer's objective
  (:mod:`rosmap_geneformer.training.masking`). Batches are grouped by length and padded on the
  right.
- ``checkpoint``: a local Geneformer checkpoint (e.g. Geneformer-V1-10M), validated against the
  token dictionary and the tokenizer settings
  (:func:`rosmap_geneformer.geneformer.model.validate_checkpoint`), then re-saved
  (:mod:`rosmap_geneformer.training.checkpoint`).

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
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import BertConfig, BertForMaskedLM, TrainingArguments

from rosmap_geneformer import distributed
from rosmap_geneformer.errors import InputError
from rosmap_geneformer.geneformer.model import DeviceSettings, select_device
from rosmap_geneformer.io import atomic_output
from rosmap_geneformer.training.masking import (
    MaskedGeneCollator,
    argmax_logits,
    masked_accuracy,
)
from rosmap_geneformer.training.trainer import (
    GeneformerTrainer,
    live_callbacks,
    live_output,
)

logger = logging.getLogger(__name__)

SOURCES = ("pretrain", "checkpoint")
SUMMARY_FILE = "base_model.json"


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
            raise InputError(msg)
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
            raise InputError(msg)
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
        raise InputError(msg)
    if len(dataset) == 0:
        msg = f"{source}: holds no cell."
        raise InputError(msg)
    # The selected rows as one Arrow table (zero-copy for an unselected, memory-mapped dataset).
    table = dataset.select_columns(["input_ids", "length"]).with_format("arrow")[:]
    ids = table.column("input_ids")
    n_tokens = pc.list_value_length(ids)
    length = table.column("length")
    if not pc.all(pc.equal(n_tokens, length)).as_py():
        msg = f"{source}: column 'length' differs from the number of input_ids in some cells."
        raise InputError(msg)
    flat = pc.list_flatten(ids)
    lo, hi = pc.min_max(flat).values()
    if lo.as_py() is not None and (lo.as_py() < 0 or hi.as_py() >= vocab_size):
        msg = (
            f"{source}: token ids span [{lo.as_py()}, {hi.as_py()}] but the vocabulary has "
            f"{vocab_size} tokens. The dataset was tokenized with another dictionary; rerun the "
            "tokenize stage with models/dictionaries."
        )
        raise InputError(msg)
    longest = int(pc.max(n_tokens).as_py())
    if longest > max_length:
        msg = (
            f"{source}: cells have up to {longest} tokens but the model takes at most "
            f"{max_length} (tokenize.model_input_size / max_position_embeddings); retokenize."
        )
        raise InputError(msg)
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
        raise InputError(msg)
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
def _scratch(path: str | Path | None, *, owner: bool = True) -> Iterator[Path]:
    """Trainer's working folder: ``path`` (a fixed name keeps the logged arguments the same
    from run to run) or a temporary folder; emptied afterwards either way. Under a launcher
    only rank 0 (the ``owner``, which saves Trainer's checkpoints) empties it."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="rosmap-pretrain-") as tmp:
            yield Path(tmp)
        return
    path = Path(path)
    if owner:
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if owner:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _model_output(path: Path, *, owner: bool) -> Iterator[Path | None]:
    """``atomic_output`` for rank 0; ``None`` for the launcher's other processes."""
    if not owner:
        yield None
        return
    with atomic_output(path) as tmp:
        yield tmp


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
        raise InputError(msg)
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
    logger.info("model: %s parameters, %s", f"{n_parameters:,}", architecture(config))

    output_dir, live_dir = Path(output_dir), None if live_dir is None else Path(live_dir)
    # Under a launcher every process trains (Trainer's DistributedDataParallel); rank 0 writes.
    owner = distributed.current().is_main
    with (
        _model_output(output_dir, owner=owner) as model_tmp,
        live_output(live_dir if owner else None) as live_tmp,
        _scratch(scratch_dir, owner=owner) as scratch,
    ):
        args = _training_arguments(
            settings,
            output_dir=scratch,
            seed=seed,
            device=device,
            has_eval=eval_ds is not None,
        )
        callbacks = live_callbacks(live_tmp)
        trainer = GeneformerTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=collator,
            compute_metrics=masked_accuracy if eval_ds is not None else None,
            preprocess_logits_for_metrics=argmax_logits if eval_ds is not None else None,
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
            "architecture": architecture(config),
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
        if model_tmp is not None:
            model_tmp.mkdir()
            save_base_model(trainer.model, model_tmp, summary)
    logger.info(
        "pretrained in %.0f s: eval loss %s -> %s",
        train_seconds,
        summary["eval_loss_initial"],
        summary["eval_loss_final"],
    )
    return summary


def _maybe(metrics: Mapping[str, Any], key: str) -> float | None:
    return float(metrics[key]) if key in metrics else None


def architecture(config: BertConfig) -> dict[str, Any]:
    """The shape of a BERT config that the summary records (vocabulary, layers, widths)."""
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


# --------------------------------------------------------------------------------------------
# Saving


def save_base_model(model: BertForMaskedLM, directory: Path, summary: Mapping[str, Any]) -> None:
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


__all__ = [
    "SOURCES",
    "SUMMARY_FILE",
    "PretrainSettings",
    "architecture",
    "check_tokenized",
    "holdout_split",
    "pretrain",
    "save_base_model",
]
