"""Stage base_model: the BERT that fine-tuning starts from, pretrained here or imported.

``base_model.source: pretrain`` builds a small BERT with Geneformer's architecture
(``base_model.architecture``; vocabulary from ``${paths.dictionaries}``, positions from
``tokenize.model_input_size``) and pretrains it by masked-gene prediction on
``${paths.tokenized}/train.dataset`` (``base_model.pretrain``). ``checkpoint`` validates the
local Geneformer checkpoint folder ``base_model.checkpoint`` against the dictionaries and the
tokenizer settings and saves it; nothing is downloaded. Either way the masked-gene loss on the
same held-out train cells is logged, so the two sources compare in ``dvc exp show``.

Writes ``${paths.base_model}/`` (config.json, model.safetensors, base_model.json) and the dvclive
log ``${paths.dvclive}/base_model/``.
"""

from __future__ import annotations

from pathlib import Path

from rosmap_geneformer import distributed, io
from rosmap_geneformer.errors import InputError, MissingInputError, run_stage
from rosmap_geneformer.geneformer.dictionaries import (
    GENE_MEDIAN_DICTIONARY_FILE,
    TOKEN_DICTIONARY_FILE,
    load_dictionaries,
)
from rosmap_geneformer.geneformer.model import config_from_params
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import stage_arguments
from rosmap_geneformer.training.checkpoint import import_checkpoint
from rosmap_geneformer.training.pretrain import PretrainSettings, pretrain


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    distributed.configure_threads(params.compute.threads, distributed.current())
    seed = params.seed
    source = params.base_model.source
    dictionary_dir = Path(params.paths.dictionaries)
    token_path = dictionary_dir / TOKEN_DICTIONARY_FILE
    token_dictionary = load_dictionaries(
        token_path, dictionary_dir / GENE_MEDIAN_DICTIONARY_FILE
    ).token_dictionary
    train_path = Path(params.paths.tokenized) / "train.dataset"
    if not train_path.is_dir():
        msg = f"{train_path}: tokenized train dataset not found. Run `dvc repro tokenize@train`."
        raise MissingInputError(msg)
    train = io.read_dataset(train_path)
    model_input_size = params.tokenize.model_input_size
    settings = PretrainSettings.from_params(params.base_model.pretrain.values())
    output_dir = Path(params.paths.base_model)
    live_dir = Path(params.paths.dvclive) / "base_model"

    if source == "pretrain":
        config = config_from_params(
            params.base_model.architecture.values(),
            token_dictionary=token_dictionary,
            model_input_size=model_input_size,
        )
        pretrain(
            train,
            token_dictionary=token_dictionary,
            config=config,
            settings=settings,
            output_dir=output_dir,
            live_dir=live_dir,
            seed=seed,
            source=str(train_path),
            scratch_dir=Path(params.paths.checkpoints) / "base_model",
        )
        distributed.end()
        return
    if not distributed.current().is_main:
        return  # importing a checkpoint is one process's work; rank 0 writes it
    checkpoint = params.base_model.checkpoint
    if not checkpoint:
        msg = (
            "params.yaml: base_model.source is 'checkpoint' but base_model.checkpoint is empty; "
            "set it to a local Geneformer checkpoint folder (e.g. models/Geneformer-V1-10M)."
        )
        raise InputError(msg)
    import_checkpoint(
        checkpoint,
        output_dir=output_dir,
        token_dictionary=token_dictionary,
        model_input_size=model_input_size,
        special_tokens=params.tokenize.special_tokens,
        train=train,
        settings=settings,
        live_dir=live_dir,
        seed=seed,
        dictionary_source=str(token_path),
    )


if __name__ == "__main__":
    run_stage(main)
