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

from rosmap_geneformer import io
from rosmap_geneformer.geneformer import modeling
from rosmap_geneformer.geneformer.dictionaries import (
    GENE_MEDIAN_DICTIONARY_FILE,
    TOKEN_DICTIONARY_FILE,
    load_dictionaries,
)
from rosmap_geneformer.logs import setup_logging
from rosmap_geneformer.params import get, stage_arguments


def main(argv: list[str] | None = None) -> None:
    _, params = stage_arguments(argv, description=__doc__)
    setup_logging()
    seed = int(get(params, "seed"))
    source = get(params, "base_model.source")
    if source not in modeling.SOURCES:
        msg = f"params.yaml: base_model.source={source!r}; use one of {modeling.SOURCES}."
        raise ValueError(msg)
    dictionary_dir = Path(get(params, "paths.dictionaries"))
    token_path = dictionary_dir / TOKEN_DICTIONARY_FILE
    token_dictionary = load_dictionaries(
        token_path, dictionary_dir / GENE_MEDIAN_DICTIONARY_FILE
    ).token_dictionary
    train_path = Path(get(params, "paths.tokenized")) / "train.dataset"
    if not train_path.is_dir():
        msg = f"{train_path}: tokenized train dataset not found. Run `dvc repro tokenize@train`."
        raise FileNotFoundError(msg)
    train = io.read_dataset(train_path)
    model_input_size = int(get(params, "tokenize.model_input_size"))
    settings = modeling.PretrainSettings.from_params(get(params, "base_model.pretrain"))
    output_dir = Path(get(params, "paths.base_model"))
    live_dir = Path(get(params, "paths.dvclive")) / "base_model"

    if source == "pretrain":
        config = modeling.config_from_params(
            get(params, "base_model.architecture"),
            token_dictionary=token_dictionary,
            model_input_size=model_input_size,
        )
        modeling.pretrain(
            train,
            token_dictionary=token_dictionary,
            config=config,
            settings=settings,
            output_dir=output_dir,
            live_dir=live_dir,
            seed=seed,
            source=str(train_path),
            scratch_dir=Path(get(params, "paths.checkpoints")) / "base_model",
        )
        return
    checkpoint = get(params, "base_model.checkpoint")
    if not checkpoint:
        msg = (
            "params.yaml: base_model.source is 'checkpoint' but base_model.checkpoint is empty; "
            "set it to a local Geneformer checkpoint folder (e.g. models/Geneformer-V1-10M)."
        )
        raise ValueError(msg)
    modeling.import_checkpoint(
        checkpoint,
        output_dir=output_dir,
        token_dictionary=token_dictionary,
        model_input_size=model_input_size,
        special_tokens=bool(get(params, "tokenize.special_tokens")),
        train=train,
        settings=settings,
        live_dir=live_dir,
        seed=seed,
        dictionary_source=str(token_path),
    )


if __name__ == "__main__":
    main()
