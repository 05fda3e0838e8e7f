"""Tests of rosmap_geneformer.training.masking: the masked-gene collator (BERT's 80/10/10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rosmap_geneformer.training.masking import MaskedGeneCollator
from tiny_bert import N_GENES, V1_DICT, V2_DICT, make_cells

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
    collator = MaskedGeneCollator(V2_DICT, mlm_probability=0.15, seed=0)
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
        collator = MaskedGeneCollator(V2_DICT, seed=seed)
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
    batch = MaskedGeneCollator(V1_DICT | {"<cls>": 62, "<eos>": 63}, seed=0)(features)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"].dtype == torch.int64
    np.testing.assert_array_equal(
        batch["attention_mask"].numpy(), [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    )
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["labels"] != -100).sum() >= 1  # never a batch without a target

    padded = MaskedGeneCollator(V2_DICT, seed=0, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].shape == (3, 8)


def test_collator_passes_premasked_cells_through():
    collator = MaskedGeneCollator(V2_DICT, seed=0)
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
