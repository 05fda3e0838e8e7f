"""Tiny Geneformer-style vocabularies, cells, BERT configs and checkpoints, shared by the tests of
``geneformer/model.py`` (tests/geneformer/test_model.py) and of masked-gene pretraining
(tests/training/test_masking.py, tests/training/test_pretrain.py)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import BertForMaskedLM

from rosmap_geneformer.geneformer.model import geneformer_bert_config

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
    return geneformer_bert_config(**kwargs)


def save_checkpoint(folder: Path) -> Path:
    """A tiny Geneformer-style checkpoint folder matching ``V2_DICT``."""
    torch.manual_seed(0)
    path = folder / "checkpoint"
    BertForMaskedLM(tiny_config()).save_pretrained(path)
    return path
