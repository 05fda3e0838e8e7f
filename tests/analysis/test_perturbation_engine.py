"""Tests for rosmap_geneformer.analysis.perturbation.engine: the perturbed encodings, and the
batched engine against one forward pass per perturbation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import BertModel

from builders import one_thread, tiny_geneformer_config
from rosmap_geneformer.analysis.perturbation import encodings, engine

VOCAB = 80


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models run fastest, and steadiest on a busy machine, on one thread."""
    with one_thread():
        yield


# ------------------------------------------------------------------------------------------
# Encodings


def test_delete_tokens_v1_and_v2():
    assert encodings.delete_tokens([7, 5, 9, 4], [9]).tolist() == [7, 5, 4]
    assert encodings.delete_tokens([7, 5, 9, 4], [9, 7]).tolist() == [5, 4]
    assert encodings.delete_tokens([2, 7, 5, 9, 3], [5]).tolist() == [2, 7, 9, 3]
    assert encodings.delete_tokens([7, 5], [11]).tolist() == [7, 5]  # absent: unchanged


def test_overexpress_present_genes_move_to_the_front():
    # V1: position 0; several genes keep their original relative order.
    assert encodings.overexpress_tokens([7, 5, 9, 4], [4], special_tokens=False).tolist() == [
        4,
        7,
        5,
        9,
    ]
    assert encodings.overexpress_tokens([7, 5, 9, 4], [4, 5], special_tokens=False).tolist() == [
        5,
        4,
        7,
        9,
    ]
    # V2: right after <cls>; <eos> stays last.
    assert encodings.overexpress_tokens([2, 7, 5, 9, 3], [9], special_tokens=True).tolist() == [
        2,
        9,
        7,
        5,
        3,
    ]


def test_overexpress_absent_genes_are_inserted_and_truncated():
    assert encodings.overexpress_tokens(
        [7, 5, 9, 4], [11], special_tokens=False, max_length=4
    ).tolist() == [11, 7, 5, 9]
    # V2 keeps <eos> as the last token after truncation.
    assert encodings.overexpress_tokens(
        [2, 7, 5, 9, 3], [11], special_tokens=True, max_length=5
    ).tolist() == [2, 11, 7, 5, 3]
    assert encodings.overexpress_tokens(
        [2, 7, 5, 3], [5, 11], special_tokens=True, max_length=8
    ).tolist() == [2, 5, 11, 7, 3]


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("perturb_type", ["delete", "overexpress"])
def test_perturbation_batch_equals_one_encoding_per_gene(special, perturb_type):
    rng = np.random.default_rng(0)
    genes = rng.choice(np.arange(4, VOCAB), size=17, replace=False).astype(np.int16)
    ids = np.concatenate([[2], genes, [3]]).astype(np.int16) if special else genes
    window = encodings.gene_slice(len(ids), special_tokens=special)
    positions = np.arange(window.start, window.stop)
    batch, index = encodings.perturbation_batch(
        ids, positions, perturb_type=perturb_type, special_tokens=special
    )
    assert batch.dtype == ids.dtype
    for row, p in enumerate(positions):
        token = [ids[p]]
        if perturb_type == "delete":
            expected = encodings.delete_tokens(ids, token)
        else:
            expected = encodings.overexpress_tokens(ids, token, special_tokens=special)
        np.testing.assert_array_equal(batch[row], expected)
        np.testing.assert_array_equal(ids[index[row]], expected)


def test_perturbation_batch_refuses_special_positions():
    with pytest.raises(ValueError, match="non-gene position"):
        encodings.perturbation_batch([2, 7, 5, 3], [0], perturb_type="delete", special_tokens=True)


# ------------------------------------------------------------------------------------------
# The batched engine equals one forward pass per perturbation


@pytest.fixture(scope="module")
def random_encoder() -> BertModel:
    torch.manual_seed(0)
    config = tiny_geneformer_config(VOCAB, num_hidden_layers=3, dropout=0.02)
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False).eval()


def cells_for(n: int, *, special: bool, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        genes = rng.choice(np.arange(4, VOCAB), size=int(rng.integers(6, 30)), replace=False)
        out.append(np.concatenate([[2], genes, [3]]) if special else genes)
    return out


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("perturb_type", ["delete", "overexpress"])
def test_batched_shifts_equal_naive_forward_passes(random_encoder, special, perturb_type):
    cells = cells_for(6, special=special, seed=1)
    rng = np.random.default_rng(2)
    positions = []
    for ids in cells:
        window = encodings.gene_slice(len(ids), special_tokens=special)
        candidates = np.arange(window.start + 1, window.stop)
        positions.append(np.sort(rng.choice(candidates, size=5, replace=False)))
    positions[2] = positions[2][:0]  # a cell with nothing to perturb is skipped
    stats_ = engine.EngineStats()
    results = list(
        engine.perturb_cells(
            random_encoder,
            cells,
            positions,
            perturb_type=perturb_type,
            layer_index=2,
            special_tokens=special,
            max_tokens=70,  # forces many batches, chunks and mixed lengths
            progress=False,
            engine_stats=stats_,
        )
    )
    assert sorted(r.cell for r in results) == [0, 1, 3, 4, 5]
    assert stats_.perturbations == 25
    lengths = [len(cells[r.cell]) for r in results]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    for result in results:
        original, perturbed = engine.naive_cell_shifts(
            random_encoder,
            cells[result.cell],
            positions[result.cell],
            perturb_type=perturb_type,
            layer_index=2,
            special_tokens=special,
        )
        np.testing.assert_array_equal(result.tokens, cells[result.cell][positions[result.cell]])
        np.testing.assert_allclose(result.original, original, atol=1e-5)
        np.testing.assert_allclose(result.perturbed, perturbed, atol=1e-5)
        naive_cos = engine.cosine(perturbed, original[None])
        np.testing.assert_allclose(result.cell_cosines, naive_cos, atol=1e-6)


@pytest.mark.parametrize("special", [False, True])
def test_gene_mode_aligns_remaining_genes(random_encoder, special):
    cells = cells_for(3, special=special, seed=5)
    window = [encodings.gene_slice(len(c), special_tokens=special) for c in cells]
    positions = [np.array([w.start, w.start + 3]) for w in window]
    results = engine.perturb_cells(
        random_encoder,
        cells,
        positions,
        perturb_type="delete",
        layer_index=3,
        special_tokens=special,
        gene_mode=True,
        progress=False,
    )
    for result in results:
        ids = cells[result.cell]
        with torch.no_grad():
            full = random_encoder(input_ids=torch.tensor(ids[None]), output_hidden_states=True)
        original = full.hidden_states[3][0].numpy()
        for k, p in enumerate(positions[result.cell]):
            perturbed_ids = np.delete(ids, p)
            with torch.no_grad():
                out = random_encoder(
                    input_ids=torch.tensor(perturbed_ids[None]), output_hidden_states=True
                )
            perturbed = out.hidden_states[3][0].numpy()
            keep = np.ones(len(ids), bool)
            keep[p] = False
            aligned = original[keep]
            expected_tokens = perturbed_ids
            if special:
                aligned, perturbed, expected_tokens = (
                    aligned[1:-1],
                    perturbed[1:-1],
                    expected_tokens[1:-1],
                )
            np.testing.assert_array_equal(result.gene_tokens[k], expected_tokens)
            np.testing.assert_allclose(
                result.gene_cosines[k], engine.cosine(perturbed, aligned), atol=1e-5
            )


def test_bfloat16_precision_keeps_the_ranking_of_shifts(random_encoder):
    cells = cells_for(4, special=False, seed=9)
    positions = [np.arange(len(c)) for c in cells]

    def shifts(precision: str) -> np.ndarray:
        results = engine.perturb_cells(
            random_encoder,
            cells,
            positions,
            perturb_type="delete",
            layer_index=3,
            special_tokens=False,
            precision=precision,
            progress=False,
        )
        return np.concatenate([1.0 - r.cell_cosines for r in sorted(results, key=lambda r: r.cell)])

    exact, fast = shifts("float32"), shifts("bfloat16")
    assert stats.spearmanr(exact, fast).statistic > 0.95
    assert np.abs(exact - fast).max() < 0.1 * np.ptp(exact)
    with pytest.raises(ValueError, match="precision"):
        shifts("float16")
