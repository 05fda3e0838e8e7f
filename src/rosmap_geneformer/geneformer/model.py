"""Geneformer's model: its BERT configuration, the device it runs on, and local checkpoints.

- :func:`geneformer_bert_config` and :func:`config_from_params`: a ``BertConfig`` with
  Geneformer's architecture (``geneformer-spec.md`` section 3: ReLU, absolute positions,
  ``<pad>`` 0, two token types, LayerNorm eps 1e-12, initializer range 0.02) at a given size.
- :func:`validate_checkpoint`: a local Geneformer checkpoint (e.g. Geneformer-V1-10M) checked
  against the token dictionary and the tokenizer settings; each error names the fix.
- :func:`select_device`: CUDA (bf16 where supported, SDPA attention) when a GPU is visible, else
  the CPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig

from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.geneformer.dictionaries import CLS, EOS, PAD

logger = logging.getLogger(__name__)

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
        raise InputError(msg)
    if hidden_size % num_attention_heads:
        msg = (
            f"base_model.architecture: hidden_size {hidden_size} is not a multiple of "
            f"num_attention_heads {num_attention_heads}."
        )
        raise InputError(msg)
    for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        if not 0 <= value < 1:
            msg = f"base_model.architecture: {name}={value!r} must be in [0, 1)."
            raise InputError(msg)
    if not 0 <= pad_token_id < vocab_size:
        msg = f"pad_token_id {pad_token_id} is outside the vocabulary (size {vocab_size})."
        raise InputError(msg)
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
        raise InputError(msg)
    if PAD not in token_dictionary:
        msg = "token dictionary lacks '<pad>'."
        raise InputError(msg)
    return geneformer_bert_config(
        vocab_size=len(token_dictionary),
        max_position_embeddings=int(model_input_size),
        pad_token_id=int(token_dictionary[PAD]),
        **architecture,
    )


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
        raise MissingInputError(msg)
    config_path = path / "config.json"
    if not config_path.is_file():
        msg = f"{path}: no config.json; a checkpoint folder holds config.json and the weights."
        raise MissingInputError(msg)
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        msg = (
            f"{path}: no weights ({', '.join(_WEIGHT_FILES)}). Are they Git LFS pointers or "
            "missing from the download?"
        )
        raise MissingInputError(msg)
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        msg = f"{config_path}: not valid JSON ({err})."
        raise InputError(msg) from err
    where = f"{config_path}"
    if raw.get("model_type") != "bert":
        msg = (
            f"{where}: model_type is {raw.get('model_type')!r}, expected 'bert'. Geneformer "
            "checkpoints are BERT models; point base_model.checkpoint at one."
        )
        raise InputError(msg)
    config = BertConfig.from_dict(raw)
    n_tokens = len(token_dictionary)
    if config.vocab_size != n_tokens:
        msg = (
            f"{where}: vocab_size is {config.vocab_size} but {dictionary_source} has "
            f"{n_tokens:,} tokens, so token ids would mean different genes. {_hint(config.vocab_size)}"
        )
        raise InputError(msg)
    if config.max_position_embeddings < model_input_size:
        msg = (
            f"{where}: max_position_embeddings is {config.max_position_embeddings} but "
            f"tokenize.model_input_size is {model_input_size}; the model cannot read cells that "
            f"long. Set tokenize.model_input_size: {config.max_position_embeddings} and rerun "
            "`dvc repro`."
        )
        raise InputError(msg)
    pad = token_dictionary.get(PAD)
    if config.pad_token_id is None or pad is None or int(config.pad_token_id) != int(pad):
        msg = (
            f"{where}: pad_token_id is {config.pad_token_id!r} but {dictionary_source} maps "
            f"<pad> to {pad!r}. Use the dictionary the checkpoint was trained with (Geneformer: "
            "<pad> = 0)."
        )
        raise InputError(msg)
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        msg = (
            f"{where}: position_embedding_type is {position!r}, expected 'absolute' "
            "(Geneformer's; transformers' BERT supports no other)."
        )
        raise InputError(msg)
    has_specials = CLS in token_dictionary and EOS in token_dictionary
    if special_tokens and not has_specials:
        msg = (
            f"{path}: tokenize.special_tokens is true but {dictionary_source} has no "
            f"<cls>/<eos> (a V1 dictionary). Set tokenize.special_tokens: false for V1 "
            "checkpoints, or use a V2 checkpoint with the gc104M dictionary."
        )
        raise InputError(msg)
    if has_specials and not special_tokens:
        logger.warning(
            "%s: the dictionary has <cls>/<eos> (V2) but tokenize.special_tokens is false; "
            "V2 models were trained on cells framed by <cls> ... <eos> (Geneformer warns too)",
            path,
        )
    return config


__all__ = [
    "ARCHITECTURE_KEYS",
    "KNOWN_VOCABULARIES",
    "DeviceSettings",
    "config_from_params",
    "geneformer_bert_config",
    "select_device",
    "validate_checkpoint",
]
