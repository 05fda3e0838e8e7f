"""The base model from a local Geneformer checkpoint (``base_model.source: checkpoint``):
validated against the token dictionary and the tokenizer settings, measured on the same
held-out cells and masks as :func:`~rosmap_geneformer.training.pretrain.pretrain`, and re-saved
like a pretrained model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import BertForMaskedLM

from rosmap_geneformer.errors import InputError
from rosmap_geneformer.geneformer.model import DeviceSettings, select_device, validate_checkpoint
from rosmap_geneformer.io import atomic_output
from rosmap_geneformer.training.masking import evaluate_masked_genes
from rosmap_geneformer.training.pretrain import (
    PretrainSettings,
    architecture,
    check_tokenized,
    holdout_split,
    save_base_model,
)
from rosmap_geneformer.training.trainer import live_output, open_live

logger = logging.getLogger(__name__)


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
        raise InputError(msg)
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
        "architecture": architecture(config),
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
        with live_output(live_dir) as live_tmp:
            live = open_live(live_tmp)
            live.log_params({"source": "checkpoint", "checkpoint": path.as_posix()})
            live.log_metric("n_parameters", summary["n_parameters"])
            live.end()
    with atomic_output(output_dir) as tmp:
        tmp.mkdir()
        save_base_model(model, tmp, summary)
    logger.info("imported %s (%s parameters)", path, f"{summary['n_parameters']:,}")
    return summary
