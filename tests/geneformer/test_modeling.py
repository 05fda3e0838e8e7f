from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForMaskedLM

from builders import load_stage, write_params
from rosmap_geneformer.geneformer import modeling
from rosmap_geneformer.geneformer.dictionaries import build_dictionaries, save_dictionaries

STAGE = Path(__file__).resolve().parents[2] / "src" / "stages" / "base_model.py"
N_GENES = 60
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]
V2_DICT = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3} | {
    g: i + 4 for i, g in enumerate(GENES)
}
V1_DICT = {"<pad>": 0, "<mask>": 1} | {g: i + 2 for i, g in enumerate(GENES)}
MAX_LEN = 32


def make_cells(n: int, *, seed: int = 0, max_len: int = MAX_LEN) -> datasets.Dataset:
    """V2-style cells (<cls> genes <eos>) drawn from two gene programs, so that there is
    something to learn: even cells rank genes 4..63 ascending, odd cells descending."""
    rng = np.random.default_rng(seed)
    cells = []
    for i in range(n):
        n_genes = int(rng.integers(8, max_len - 1))
        program = np.arange(4, 4 + N_GENES) if i % 2 else np.arange(3 + N_GENES, 3, -1)
        cells.append([2, *program[:n_genes].tolist(), 3])
    return datasets.Dataset.from_dict(
        {
            "input_ids": cells,
            "length": [len(c) for c in cells],
            "cell_id": [f"cell{i:03d}" for i in range(n)],
            "patient_id": [f"P{i % 4}" for i in range(n)],
            "cell_type": ["Exc" if i % 2 else "Mic" for i in range(n)],
            "ad_status": ["AD" if i % 3 else "control" for i in range(n)],
        }
    )


def tiny_config(**overrides):
    kwargs = {
        "vocab_size": len(V2_DICT),
        "max_position_embeddings": MAX_LEN,
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "dropout": 0.0,
        "pad_token_id": 0,
    } | overrides
    return modeling.geneformer_bert_config(**kwargs)


def architecture(**overrides: object) -> dict[str, object]:
    """A ``base_model.architecture`` params section: 2 layers, 32 wide, 4 heads, no dropout."""
    return {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "dropout": 0.0,
    } | overrides


SETTINGS = modeling.PretrainSettings(
    epochs=3, learning_rate=3e-3, batch_size=8, eval_fraction=0.2, logging_steps=2
)


def run_pretrain(out: Path, *, seed: int = 0, live: bool = True) -> dict:
    return modeling.pretrain(
        make_cells(40),
        token_dictionary=V2_DICT,
        config=tiny_config(),
        settings=SETTINGS,
        output_dir=out / "base",
        live_dir=out / "dvclive" if live else None,
        seed=seed,
    )


# ------------------------------------------------------------------------------------ config


def test_config_follows_geneformer_conventions():
    config = modeling.config_from_params(
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
        modeling.config_from_params(
            architecture(layers=3),
            token_dictionary=V2_DICT,
            model_input_size=64,
        )
    assert tiny_config(dropout=0.1, attention_dropout=0.0).attention_probs_dropout_prob == 0.0


def test_select_device_on_cpu():
    device = modeling.select_device(allow_cuda=False)
    assert device.device == "cpu" and not device.bf16
    assert device.attn_implementation == "sdpa"
    assert device.training_arguments() == {"use_cpu": True, "bf16": False}


def test_sdpa_matches_eager_on_cpu():
    torch.manual_seed(0)
    eager = BertForMaskedLM._from_config(tiny_config(), attn_implementation="eager").eval()
    sdpa = BertForMaskedLM._from_config(tiny_config(), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    batch = modeling.MaskedGeneCollator(V2_DICT, seed=0)(
        [{"input_ids": c} for c in make_cells(6)["input_ids"]]
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        a, b = eager(**inputs).logits, sdpa(**inputs).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- collator


def big_batch(n_cells: int = 300, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    features = []
    for _ in range(n_cells):
        n = int(rng.integers(50, 400))
        genes = rng.choice(np.arange(4, 4 + N_GENES), size=n, replace=True)
        features.append({"input_ids": [2, *genes.tolist(), 3]})
    return features


def test_collator_masking_statistics():
    features = big_batch()
    collator = modeling.MaskedGeneCollator(V2_DICT, mlm_probability=0.15, seed=0)
    batch = collator(features)
    ids, labels, attention = (batch[k].numpy() for k in ("input_ids", "labels", "attention_mask"))
    original = collator.pad([f["input_ids"] for f in features], value=0)
    genes = (original >= 4) & (attention == 1)
    chosen = labels != -100

    # Only gene tokens are chosen; labels hold the original token there.
    assert not chosen[~genes].any()
    np.testing.assert_array_equal(labels[chosen], original[chosen])
    # Specials and padding pass through unchanged.
    np.testing.assert_array_equal(ids[~genes], original[~genes])
    assert abs(chosen.sum() / genes.sum() - 0.15) < 0.01

    masked = chosen & (ids == 1)
    kept = chosen & (ids == original)
    replaced = chosen & (ids != 1) & (ids != original)
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    # A random draw can hit the original gene (1/60), which then counts as kept.
    assert abs(replaced.sum() / n - 0.1 * 59 / 60) < 0.02
    assert abs(kept.sum() / n - 0.1 * 61 / 60) < 0.02
    # Random replacements are gene tokens, never special tokens.
    assert ids[replaced].min() >= 4 and ids[replaced].max() < len(V2_DICT)
    # Unchosen gene tokens are never altered.
    np.testing.assert_array_equal(ids[genes & ~chosen], original[genes & ~chosen])


def test_collator_is_seeded():
    features = big_batch(20)

    def masks(seed):
        collator = modeling.MaskedGeneCollator(V2_DICT, seed=seed)
        return [collator(features)["input_ids"] for _ in range(2)]

    first, again, other = masks(0), masks(0), masks(1)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    # The stream advances: two batches of the same cells get different masks.
    assert not torch.equal(first[0], first[1])


def test_collator_pads_right_with_attention_mask():
    features = [
        {"input_ids": [2, 5, 6, 7, 3]},
        {"input_ids": [2, 8, 3]},
        {"input_ids": [2, 9, 10, 3]},
    ]
    batch = modeling.MaskedGeneCollator(V1_DICT | {"<cls>": 62, "<eos>": 63}, seed=0)(features)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"].dtype == torch.int64
    np.testing.assert_array_equal(
        batch["attention_mask"].numpy(), [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    )
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["labels"] != -100).sum() >= 1  # never a batch without a target

    padded = modeling.MaskedGeneCollator(V2_DICT, seed=0, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].shape == (3, 8)


def test_collator_passes_premasked_cells_through():
    collator = modeling.MaskedGeneCollator(V2_DICT, seed=0)
    premasked = collator.premask(make_cells(10), seed=5)
    assert premasked.column_names == ["input_ids", "labels", "length"]
    assert premasked["input_ids"] == collator.premask(make_cells(10), seed=5)["input_ids"]
    rows = [premasked[i] for i in range(3)]
    batch = collator(rows)
    for row, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
        n = len(rows[row]["input_ids"])
        assert ids[:n].tolist() == rows[row]["input_ids"]
        assert labels[:n].tolist() == rows[row]["labels"]
        assert (labels[n:] == -100).all()
    with pytest.raises(ValueError, match="mixes"):
        collator([rows[0], {"input_ids": [2, 5, 3]}])


# ------------------------------------------------------------------------------- pretraining


def test_pretrain_learns_saves_and_reloads(tmp_path: Path):
    summary = run_pretrain(tmp_path)
    base = tmp_path / "base"
    assert sorted(p.name for p in base.iterdir()) == [
        "base_model.json",
        "config.json",
        "model.safetensors",
    ]
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    assert summary["data"] == {
        "input_cells": 40,
        "input_tokens": sum(make_cells(40)["length"]),
        "input_min_length": min(make_cells(40)["length"]),
        "input_max_length": max(make_cells(40)["length"]),
        "pretrain_cells": 32,
        "eval_cells": 8,
        "unused_cells": 0,
    }
    assert json.loads((base / "base_model.json").read_text()) == summary
    assert summary["n_parameters"] == BertForMaskedLM(tiny_config()).num_parameters()

    reloaded = BertForMaskedLM.from_pretrained(base)
    saved = load_file(base / "model.safetensors")
    state = reloaded.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert reloaded.config.hidden_act == "relu" and reloaded.config.vocab_size == len(V2_DICT)

    metrics = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert metrics["eval"]["loss"] == pytest.approx(summary["eval_loss_final"])
    assert "masked_accuracy" in metrics["eval"]
    assert (tmp_path / "dvclive" / "plots" / "metrics" / "loss.tsv").is_file()
    # Nothing but the outputs: no temporary folders left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "dvclive"]


def test_pretrain_is_deterministic(tmp_path: Path):
    run_pretrain(tmp_path / "a", live=False)
    run_pretrain(tmp_path / "b", live=False)
    run_pretrain(tmp_path / "c", seed=1, live=False)
    a, b, c = (load_file(tmp_path / x / "base" / "model.safetensors") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretrain_refuses_mismatched_data(tmp_path: Path):
    cells = make_cells(10)
    with pytest.raises(ValueError, match="vocab_size"):
        modeling.pretrain(
            cells,
            token_dictionary=V1_DICT,
            config=tiny_config(),
            settings=SETTINGS,
            output_dir=tmp_path / "base",
            live_dir=None,
            seed=0,
        )
    with pytest.raises(ValueError, match="up to .* tokens"):
        modeling.check_tokenized(cells, vocab_size=len(V2_DICT), max_length=8, source="x")
    with pytest.raises(ValueError, match="token ids span"):
        modeling.check_tokenized(cells, vocab_size=20, max_length=MAX_LEN, source="x")
    assert not (tmp_path / "base").exists()


def test_settings_and_holdout():
    with pytest.raises(ValueError, match="unknown key"):
        modeling.PretrainSettings.from_params({"epochs": 1, "lr": 0.1})
    with pytest.raises(ValueError, match="warmup_ratio"):
        modeling.PretrainSettings.from_params({"warmup_ratio": 1.0})
    train, held = modeling.holdout_split(100, max_cells=50, eval_fraction=0.1, seed=0)
    assert len(train) == 45 and len(held) == 5 and not set(train) & set(held)
    again = modeling.holdout_split(100, max_cells=50, eval_fraction=0.1, seed=0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(held, again[1])


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny Geneformer-style checkpoint folder matching ``V2_DICT``."""
    torch.manual_seed(0)
    path = tmp_path / "checkpoint"
    BertForMaskedLM(tiny_config()).save_pretrained(path)
    return path


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
    return modeling.validate_checkpoint(path, **kwargs)


def import_checkpoint(path: Path, out: Path, **overrides) -> dict:
    """Import ``path`` into ``out/base``, logging to ``out/dvclive``; no evaluation unless
    ``overrides`` pass ``train`` and ``settings``."""
    kwargs = {
        "output_dir": out / "base",
        "token_dictionary": V2_DICT,
        "model_input_size": MAX_LEN,
        "special_tokens": True,
        "live_dir": out / "dvclive",
    } | overrides
    return modeling.import_checkpoint(path, **kwargs)


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
    with caplog.at_level(logging.WARNING, logger="rosmap_geneformer.geneformer.modeling"):
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


def test_import_checkpoint_saves_identical_weights(tmp_path: Path, checkpoint: Path):
    summary = import_checkpoint(
        checkpoint, tmp_path, train=make_cells(40), settings=SETTINGS, seed=0
    )
    assert summary["source"] == "checkpoint" and summary["eval_cells"] == 8
    assert summary["missing_head_tensors"] == 0
    original, imported = (
        load_file(p / "model.safetensors") for p in (checkpoint, tmp_path / "base")
    )
    assert original.keys() == imported.keys()
    assert all(torch.equal(original[k], imported[k]) for k in original)
    metrics = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert metrics["eval"]["loss"] == pytest.approx(summary["eval_loss_final"])


def test_import_checkpoint_without_evaluation_still_logs(tmp_path: Path, checkpoint: Path):
    summary = import_checkpoint(checkpoint, tmp_path)
    assert "eval_loss_final" not in summary
    metrics = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert metrics["n_parameters"] == summary["n_parameters"]
    assert (tmp_path / "dvclive" / "plots" / "metrics").is_dir()
    assert (tmp_path / "dvclive" / "params.yaml").is_file()


# ------------------------------------------------------------------------------------ stage


def stage_params(tmp_path: Path, **base_model) -> Path:
    params = {
        "seed": 0,
        "paths": {
            "dictionaries": str(tmp_path / "dictionaries"),
            "tokenized": str(tmp_path / "tokenized"),
            "base_model": str(tmp_path / "models" / "base"),
            "dvclive": str(tmp_path / "dvclive"),
            "checkpoints": str(tmp_path / "models" / "checkpoints"),
        },
        "tokenize": {"model_input_size": MAX_LEN, "special_tokens": True},
        "base_model": {
            "source": "pretrain",
            "checkpoint": None,
            "architecture": {
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "dropout": 0.0,
                "attention_dropout": 0.0,
            },
            "pretrain": {
                "epochs": 2,
                "learning_rate": 3e-3,
                "batch_size": 8,
                "warmup_ratio": 0.1,
                "weight_decay": 0.001,
                "mlm_probability": 0.15,
                "max_cells": 36,
                "eval_fraction": 0.2,
            },
        }
        | base_model,
    }
    return write_params(tmp_path, params)


def test_stage_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    stage = load_stage(STAGE)

    dictionaries = build_dictionaries(
        {g: 1.0 + i for i, g in enumerate(GENES)}, special_tokens=True
    )
    assert dictionaries.token_dictionary == V2_DICT
    save_dictionaries(dictionaries, tmp_path / "dictionaries")
    make_cells(40).save_to_disk(tmp_path / "tokenized" / "train.dataset")
    monkeypatch.chdir(tmp_path)

    stage.main(["--params", str(stage_params(tmp_path))])
    base = tmp_path / "models" / "base"
    summary = json.loads((base / "base_model.json").read_text())
    assert summary["source"] == "pretrain"
    assert summary["data"]["pretrain_cells"] + summary["data"]["eval_cells"] == 36
    assert summary["data"]["unused_cells"] == 4
    assert (tmp_path / "dvclive" / "base_model" / "metrics.json").is_file()
    assert BertForMaskedLM.from_pretrained(base).config.max_position_embeddings == MAX_LEN

    # The pretrained model serves as a local checkpoint for source: checkpoint.
    checkpoint = tmp_path / "checkpoint"
    base.rename(checkpoint)
    stage.main(
        [
            "--params",
            str(stage_params(tmp_path, source="checkpoint", checkpoint=str(checkpoint))),
        ]
    )
    imported = json.loads((base / "base_model.json").read_text())
    assert imported["source"] == "checkpoint"
    assert imported["eval_loss_final"] == pytest.approx(summary["eval_loss_final"], rel=1e-5)

    with pytest.raises(ValueError, match="base_model.checkpoint is empty"):
        stage.main(["--params", str(stage_params(tmp_path, source="checkpoint"))])
