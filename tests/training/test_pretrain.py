"""Tests of rosmap_geneformer.training.pretrain and the base_model stage: pretraining by
masked-gene prediction, and importing a local Geneformer checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForMaskedLM

from builders import load_stage, write_params
from rosmap_geneformer.geneformer.dictionaries import build_dictionaries, save_dictionaries
from rosmap_geneformer.training import checkpoint as checkpoint_import
from rosmap_geneformer.training import pretrain
from tiny_bert import GENES, MAX_LEN, V1_DICT, V2_DICT, make_cells, save_checkpoint, tiny_config

STAGE = Path(__file__).resolve().parents[2] / "src" / "stages" / "base_model.py"


SETTINGS = pretrain.PretrainSettings(
    epochs=3, learning_rate=3e-3, batch_size=8, eval_fraction=0.2, logging_steps=2
)


def run_pretrain(out: Path, *, seed: int = 0, live: bool = True) -> dict:
    return pretrain.pretrain(
        make_cells(40),
        token_dictionary=V2_DICT,
        config=tiny_config(),
        settings=SETTINGS,
        output_dir=out / "base",
        live_dir=out / "dvclive" if live else None,
        seed=seed,
    )


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
        pretrain.pretrain(
            cells,
            token_dictionary=V1_DICT,
            config=tiny_config(),
            settings=SETTINGS,
            output_dir=tmp_path / "base",
            live_dir=None,
            seed=0,
        )
    with pytest.raises(ValueError, match="up to .* tokens"):
        pretrain.check_tokenized(cells, vocab_size=len(V2_DICT), max_length=8, source="x")
    with pytest.raises(ValueError, match="token ids span"):
        pretrain.check_tokenized(cells, vocab_size=20, max_length=MAX_LEN, source="x")
    assert not (tmp_path / "base").exists()


def test_settings_and_holdout():
    with pytest.raises(ValueError, match="unknown key"):
        pretrain.PretrainSettings.from_params({"epochs": 1, "lr": 0.1})
    with pytest.raises(ValueError, match="warmup_ratio"):
        pretrain.PretrainSettings.from_params({"warmup_ratio": 1.0})
    train, held = pretrain.holdout_split(100, max_cells=50, eval_fraction=0.1, seed=0)
    assert len(train) == 45 and len(held) == 5 and not set(train) & set(held)
    again = pretrain.holdout_split(100, max_cells=50, eval_fraction=0.1, seed=0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(held, again[1])


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny Geneformer-style checkpoint folder matching ``V2_DICT``."""
    return save_checkpoint(tmp_path)


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
    return checkpoint_import.import_checkpoint(path, **kwargs)


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
