"""Tests for rosmap_geneformer.analysis.perturbation.estimate (the first pass of the deletion
screen) and for the V2 cell embedding (``<cls>``) the perturbation engine reads."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import BertModel

from builders import one_thread, run_on_ranks, tiny_geneformer_config
from rosmap_geneformer import distributed
from rosmap_geneformer.analysis import embeddings
from rosmap_geneformer.analysis.perturbation import encodings, engine, estimate
from rosmap_geneformer.analysis.perturbation.estimate import ScreenSettings
from rosmap_geneformer.errors import InputError

VOCAB = 80
LAYER = 2


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    with one_thread():
        yield


def smooth_positions(model: BertModel) -> BertModel:
    """Sinusoidal position embeddings (Vaswani et al. 2017) at the init's scale: neighbouring
    positions alike, as in trained models (the estimate interpolates along the position; random
    init has no such order)."""
    weight = model.embeddings.position_embeddings.weight
    positions, dim = weight.shape
    angle = torch.arange(positions)[:, None] / 10_000 ** (torch.arange(0, dim, 2)[None] / dim)
    table = torch.zeros(positions, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(angle), torch.cos(angle)
    with torch.no_grad():
        weight.copy_(0.02 * table)
    return model


@pytest.fixture(scope="module")
def encoder() -> BertModel:
    torch.manual_seed(0)
    config = tiny_geneformer_config(VOCAB, num_hidden_layers=3, dropout=0.02)
    config._attn_implementation = "sdpa"
    return smooth_positions(BertModel(config, add_pooling_layer=False).eval())


def random_cells(n: int, *, length: int, special: bool, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        genes = rng.choice(np.arange(4, VOCAB), size=length, replace=False)
        out.append(np.concatenate([[2], genes, [3]]) if special else genes)
    return out


def full_model_states(encoder: BertModel, ids: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        out = encoder(
            input_ids=torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True
        )
    return out.hidden_states[LAYER][0]


def gene_positions(ids: np.ndarray, special: bool) -> np.ndarray:
    window = encodings.gene_slice(len(ids), special_tokens=special)
    return np.arange(window.start, window.stop)


# ------------------------------------------------------------------------------------------
# V2: the cell embedding is the <cls> vector, as in Geneformer


def test_v2_cells_are_read_at_cls_and_v1_cells_are_gene_means(encoder):
    (v2,) = random_cells(1, length=12, special=True, seed=3)
    (v1,) = random_cells(1, length=12, special=False, seed=3)
    for ids, special in ((v2, True), (v1, False)):
        (result,) = engine.perturb_cells(
            encoder,
            [ids],
            [gene_positions(ids, special)[:4]],
            perturb_type="delete",
            layer_index=LAYER,
            special_tokens=special,
            progress=False,
        )
        states = full_model_states(encoder, ids)
        expected = states[0] if special else states.mean(dim=0)
        np.testing.assert_allclose(result.original, expected.numpy(), atol=1e-5)
        deleted = np.delete(ids, gene_positions(ids, special)[1])
        states = full_model_states(encoder, deleted)
        expected = states[0] if special else states.mean(dim=0)
        np.testing.assert_allclose(result.perturbed[1], expected.numpy(), atol=1e-5)
    # The V2 <cls> vector is not the gene mean it was before.
    states = full_model_states(encoder, v2)
    assert not np.allclose(states[0].numpy(), states[1:-1].mean(dim=0).numpy(), atol=1e-3)


def test_cell_embeddings_modes(encoder):
    states = torch.randn(2, 6, 4)
    lengths = torch.tensor([6, 4])
    cls = embeddings.pool_cells(states, lengths, special_tokens=True)
    torch.testing.assert_close(cls, states[:, 0])
    mean = embeddings.pool_cells(states, lengths, special_tokens=True, emb_mode="cell")
    torch.testing.assert_close(mean[1], states[1, 1:3].mean(dim=0))
    with pytest.raises(InputError, match="emb_mode='cls' needs cells that start with <cls>"):
        embeddings.pool_cells(states, lengths, special_tokens=False, emb_mode="cls")
    with pytest.raises(InputError, match="emb_mode='mean'"):
        embeddings.pool_cells(states, lengths, special_tokens=False, emb_mode="mean")


# ------------------------------------------------------------------------------------------
# The estimate


def removal_without_move(
    encoder: BertModel, ids: np.ndarray, position: int, centroid: np.ndarray, special: bool
) -> float:
    """The gene's own part, measured: its token masked out of attention and the mean, no token
    moving (what :func:`estimate.own_effects` estimates to first order)."""
    mask = np.ones(len(ids), dtype=np.int64)

    def readout(m: np.ndarray) -> float:
        with torch.inference_mode():
            out = encoder(
                input_ids=torch.from_numpy(ids.astype(np.int64))[None],
                attention_mask=torch.from_numpy(m)[None],
                output_hidden_states=True,
            )
        states = out.hidden_states[LAYER][0].numpy().astype(np.float64)
        cell = states[0] if special else states[m.astype(bool)].mean(axis=0)
        return float(engine.cosine(cell, centroid))

    masked = mask.copy()
    masked[position] = 0
    return readout(masked) - readout(mask)


@pytest.mark.parametrize("special", [False, True])
def test_own_effects_estimate_the_removal_to_first_order(encoder, special):
    (ids,) = random_cells(1, length=40, special=special, seed=7)
    centroid = np.random.default_rng(8).normal(size=encoder.config.hidden_size)
    own = estimate.own_effects(
        encoder, ids, {"goal": centroid}, layer_index=LAYER, special_tokens=special
    )["goal"]
    positions = gene_positions(ids, special)
    measured = np.array(
        [removal_without_move(encoder, ids, p, centroid, special) for p in positions]
    )
    assert own.shape == (len(ids),)
    assert stats.spearmanr(own[positions], measured).statistic > 0.9
    np.testing.assert_allclose(own[positions], measured, atol=0.2 * np.abs(measured).max())


@pytest.mark.parametrize("special", [False, True])
def test_estimate_is_exact_on_the_grid_and_close_elsewhere(encoder, special):
    cells = random_cells(4, length=50, special=special, seed=11)
    positions = [gene_positions(c, special) for c in cells]
    rng = np.random.default_rng(12)
    centroids = {s: rng.normal(size=encoder.config.hidden_size) for s in ("goal", "start")}
    common = {"layer_index": LAYER, "special_tokens": special, "progress": False}
    exact = {
        r.cell: r
        for r in engine.perturb_cells(encoder, cells, positions, perturb_type="delete", **common)
    }
    stats_ = estimate.EstimateStats()
    estimated = list(
        estimate.estimate_deletions(
            encoder, cells, positions, centroids, grid=8, stats=stats_, **common
        )
    )
    assert sorted(e.cell for e in estimated) == [0, 1, 2, 3]
    assert stats_.engine.perturbations == 4 * 8
    assert stats_.estimated == 4 * (50 - 8)
    assert stats_.backward_passes == 4 * 2
    all_exact, all_estimated = [], []
    for e in estimated:
        truth = exact[e.cell]
        goal = engine.cosine(truth.perturbed, centroids["goal"][None]) - engine.cosine(
            truth.original, centroids["goal"]
        )
        np.testing.assert_array_equal(e.tokens, truth.tokens)
        assert e.exact.sum() == 8 and e.exact[0] and e.exact[-1]
        np.testing.assert_allclose(e.shifts["goal"][e.exact], goal[e.exact], atol=1e-6)
        np.testing.assert_allclose(e.cell_cosines[e.exact], truth.cell_cosines[e.exact], atol=1e-6)
        all_exact.append(goal)
        all_estimated.append(e.shifts["goal"])
    rho = stats.spearmanr(np.concatenate(all_exact), np.concatenate(all_estimated)).statistic
    assert rho > 0.8, rho


def test_estimate_with_a_grid_over_every_position_is_the_exact_run(encoder):
    cells = random_cells(2, length=10, special=False, seed=13)
    positions = [gene_positions(c, False) for c in cells]
    centroids = {"goal": np.random.default_rng(14).normal(size=encoder.config.hidden_size)}
    common = {"layer_index": LAYER, "special_tokens": False, "progress": False}
    exact = {
        r.cell: r
        for r in engine.perturb_cells(encoder, cells, positions, perturb_type="delete", **common)
    }
    for e in estimate.estimate_deletions(encoder, cells, positions, centroids, grid=10, **common):
        assert e.exact.all()
        np.testing.assert_allclose(e.cell_cosines, exact[e.cell].cell_cosines, atol=1e-7)


def _estimate_on_rank(rank: int, world_size: int, port: int, model_dir: str, queue) -> None:
    os.environ.update(distributed.launcher_environment(rank, world_size, port))
    processes = distributed.start(1)
    backward_cells: list[int] = []
    own_effects = estimate.own_effects

    def counted(encoder_, ids, *args, **kwargs):
        backward_cells.append(len(ids))
        return own_effects(encoder_, ids, *args, **kwargs)

    estimate.own_effects = counted
    encoder_ = BertModel.from_pretrained(model_dir).eval()
    cells = random_cells(5, length=30, special=False, seed=21)
    positions = [gene_positions(c, False) for c in cells]
    rng = np.random.default_rng(22)
    centroids = {s: rng.normal(size=encoder_.config.hidden_size) for s in ("goal", "start")}
    stats_ = estimate.EstimateStats()
    results = [
        (e.cell, e.shifts, e.cell_cosines, e.exact)
        for e in estimate.estimate_deletions(
            encoder_,
            cells,
            positions,
            centroids,
            layer_index=LAYER,
            special_tokens=False,
            grid=6,
            progress=False,
            stats=stats_,
            processes=processes,
        )
    ]
    queue.put((rank, results, len(backward_cells), stats_.backward_passes))
    distributed.end()


def test_backward_passes_are_shared_over_processes_with_the_same_estimates(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "model")
    (reference,) = run_on_ranks(_estimate_on_rank, 1, str(tmp_path / "model"))
    reports = run_on_ranks(_estimate_on_rank, 2, str(tmp_path / "model"))
    # One process: 5 cells, 2 readouts each. Two: cells 0, 2, 4 on rank 0 and 1, 3 on rank 1.
    assert reference[2:] == (5, 10)
    assert [r[2] for r in reports] == [3, 2]
    for _, results, _, passes in reports:
        assert passes == 10  # every rank counts them all
        assert [cell for cell, *_ in results] == [cell for cell, *_ in reference[1]]
        for (_, shifts, cosines, exact), (_, ref_shifts, ref_cosines, ref_exact) in zip(
            results, reference[1], strict=True
        ):
            np.testing.assert_array_equal(exact, ref_exact)
            np.testing.assert_array_equal(cosines, ref_cosines)
            for state, values in shifts.items():
                np.testing.assert_array_equal(values, ref_shifts[state])


def test_estimate_refuses_bad_positions_and_grids(encoder):
    cells = random_cells(1, length=10, special=False, seed=15)
    centroids = {"goal": np.ones(encoder.config.hidden_size)}
    with pytest.raises(InputError, match="positions to delete must increase"):
        list(
            estimate.estimate_deletions(
                encoder,
                cells,
                [np.array([3, 1])],
                centroids,
                layer_index=LAYER,
                special_tokens=False,
                progress=False,
            )
        )
    with pytest.raises(InputError, match="grid=1: use at least 2"):
        estimate.grid_indices(10, 1)
    assert estimate.grid_indices(100, 5).tolist() == [0, 25, 50, 74, 99]


def test_screen_settings_name_the_key_and_the_fix():
    assert ScreenSettings.from_params(None) == ScreenSettings()
    with pytest.raises(
        InputError, match=r"perturb.screen.method='fast': use one of \['exact', 'estimate'\]"
    ):
        ScreenSettings.from_params({"method": "fast"})
    with pytest.raises(
        InputError, match=r"perturb.screen.confirm=0.9: use a fraction in \(0, 0.5\]"
    ):
        ScreenSettings.from_params({"confirm": 0.9})
    with pytest.raises(ValueError, match="unknown keys"):
        ScreenSettings.from_params({"top": 3})
    with pytest.raises(
        InputError, match=r"perturb.screen.confirm_fdr=1.5: use a value in \[0, 1\]"
    ):
        ScreenSettings.from_params({"confirm_fdr": 1.5})
