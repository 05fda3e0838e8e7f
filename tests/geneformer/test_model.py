"""Tests of rosmap_geneformer.geneformer.model: BERT configuration, device, checkpoint checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM

from rosmap_geneformer.geneformer.model import (
    config_from_params,
    select_device,
    validate_checkpoint,
)
from rosmap_geneformer.training.masking import MaskedGeneCollator
from tiny_bert import MAX_LEN, V1_DICT, V2_DICT, make_cells, save_checkpoint, tiny_config


def architecture(**overrides: object) -> dict[str, object]:
    """A ``base_model.architecture`` params section: 2 layers, 32 wide, 4 heads, no dropout."""
    return {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "dropout": 0.0,
    } | overrides


# ------------------------------------------------------------------------------------ config


def test_config_follows_geneformer_conventions():
    config = config_from_params(
        architecture(dropout=0.02),
        token_dictionary=V2_DICT,
        model_input_size=512,
    )
    assert config.model_type == "bert"
    assert config.hidden_act == "relu"
    assert config.position_embedding_type == "absolute"
    assert config.pad_token_id == V2_DICT["<pad>"] == 0
    assert config.type_vocab_size == 2
    assert config.layer_norm_eps == 1e-12
    assert config.initializer_range == 0.02
    assert config.vocab_size == len(V2_DICT)
    assert config.max_position_embeddings == 512
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.02
    assert config.architectures == ["BertForMaskedLM"]
    model = BertForMaskedLM(config)
    assert model.bert.embeddings.word_embeddings.num_embeddings == len(V2_DICT)
    assert model.bert.embeddings.position_embeddings.num_embeddings == 512


def test_config_rejects_bad_sizes_and_keys():
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        tiny_config(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="unknown key"):
        config_from_params(
            architecture(layers=3),
            token_dictionary=V2_DICT,
            model_input_size=64,
        )
    assert tiny_config(dropout=0.1, attention_dropout=0.0).attention_probs_dropout_prob == 0.0


def test_select_device_on_cpu():
    device = select_device(allow_cuda=False)
    assert device.device == "cpu" and not device.bf16
    assert device.attn_implementation == "sdpa"
    assert device.training_arguments() == {"use_cpu": True, "bf16": False}


def test_sdpa_matches_eager_on_cpu():
    torch.manual_seed(0)
    eager = BertForMaskedLM._from_config(tiny_config(), attn_implementation="eager").eval()
    sdpa = BertForMaskedLM._from_config(tiny_config(), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    batch = MaskedGeneCollator(V2_DICT, seed=0)(
        [{"input_ids": c} for c in make_cells(6)["input_ids"]]
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        a, b = eager(**inputs).logits, sdpa(**inputs).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny Geneformer-style checkpoint folder matching ``V2_DICT``."""
    return save_checkpoint(tmp_path)


def edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "config.json").read_text()) | changes
    (path / "config.json").write_text(json.dumps(config))
    return path


def validate(path: Path, **overrides):
    kwargs = {
        "token_dictionary": V2_DICT,
        "model_input_size": MAX_LEN,
        "special_tokens": True,
        "dictionary_source": "dict.pkl",
    } | overrides
    return validate_checkpoint(path, **kwargs)


def test_validate_checkpoint_accepts_a_matching_checkpoint(checkpoint: Path):
    config = validate(checkpoint)
    assert config.vocab_size == len(V2_DICT)


def test_validate_checkpoint_wrong_vocab_size(checkpoint: Path):
    with pytest.raises(ValueError) as err:
        validate(checkpoint, token_dictionary=V1_DICT)
    message = str(err.value)
    assert str(checkpoint / "config.json") in message
    assert "vocab_size is 64" in message and "62 tokens" in message and "dict.pkl" in message

    # Geneformer's released vocabularies get a precise fix.
    edit_config(checkpoint, vocab_size=25_426)
    with pytest.raises(ValueError, match=r"V1 \(gc30M, 25,426-token\).*dictionaries.source"):
        validate(checkpoint)


def test_validate_checkpoint_wrong_positions_and_pad(checkpoint: Path):
    with pytest.raises(ValueError, match=r"max_position_embeddings is 32 .*model_input_size is 64"):
        validate(checkpoint, model_input_size=64)
    edit_config(checkpoint, pad_token_id=1)
    with pytest.raises(ValueError, match=r"pad_token_id is 1 .* <pad> to 0"):
        validate(checkpoint)


def test_validate_checkpoint_special_tokens(checkpoint: Path, caplog: pytest.LogCaptureFixture):
    v1_sized = V1_DICT | {"ENSGX1": 62, "ENSGX2": 63}  # same size as V2_DICT, no <cls>/<eos>
    with pytest.raises(ValueError, match=r"special_tokens is true .* no <cls>/<eos>"):
        validate(checkpoint, token_dictionary=v1_sized)
    assert validate(checkpoint, token_dictionary=v1_sized, special_tokens=False)
    with caplog.at_level(logging.WARNING, logger="rosmap_geneformer.geneformer.model"):
        validate(checkpoint, special_tokens=False)
    assert "special_tokens is false" in caplog.text


def test_validate_checkpoint_missing_or_wrong_folder(tmp_path: Path, checkpoint: Path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        validate(Path("ctheodoris/Geneformer"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        validate(empty)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        validate(checkpoint)


def test_validate_checkpoint_model_type(checkpoint: Path):
    edit_config(checkpoint, model_type="roberta")
    with pytest.raises(ValueError, match="model_type is 'roberta'"):
        validate(checkpoint)
