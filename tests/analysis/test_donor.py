"""Tests of the donor-level AD classification: features, folds, methods, MIL, metrics, figures."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from rosmap_geneformer import counts, io
from rosmap_geneformer.analysis.donor import crossval, features, methods, mil, plots
from rosmap_geneformer.errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TYPES = ["Ast", "Exc", "Mic"]


def _write_matrix(path: Path, x: np.ndarray) -> Path:
    """``x`` as the pipeline stores counts: CSR float32, cell ids as obs, gene ids as var."""
    adata = ad.AnnData(
        X=sparse.csr_matrix(x.astype(np.float32)),
        obs=pd.DataFrame(index=[f"cell{i:04d}" for i in range(x.shape[0])]),
        var=pd.DataFrame(index=[f"ENSG{g:011d}" for g in range(x.shape[1])]),
    )
    io.write_h5ad(adata, path)
    return path


def _cell_table(n_matrix_rows: int, n_cells: int, *, seed: int) -> pd.DataFrame:
    """``n_cells`` annotated cells pointing at distinct, shuffled rows of the matrix."""
    rng = np.random.default_rng(seed)
    rows = rng.permutation(n_matrix_rows)[:n_cells]
    return pd.DataFrame(
        {
            "patient_id": rng.choice(["D1", "D2", "D3", "D4"], n_cells),
            "cell_type": rng.choice(TYPES, n_cells),
            "ad_status": "control",
            counts.MATRIX_ROW: rows.astype(np.int64),
        },
        index=pd.Index([f"cell{r:04d}" for r in rows], name="cell_id"),
    )


def _labels(n: int) -> np.ndarray:
    return np.arange(n) % 2


def _donor_frame(ids: list[str], labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"label": labels}, index=pd.Index(ids, name="patient_id"))


# --------------------------------------------------------------------------------------------
# features: pseudobulk


@pytest.fixture(scope="module")
def count_matrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.poisson(1.5, size=(80, 9)).astype(np.float64)
    x[:, 4] = 0.0  # a gene nobody expresses
    return _write_matrix(tmp_path_factory.mktemp("pb") / "counts.h5ad", x), x


def test_pseudobulk_sums_match_a_dense_groupby(count_matrix: tuple[Path, np.ndarray]) -> None:
    path, x = count_matrix
    cells = _cell_table(len(x), 60, seed=1)
    pb = features.pseudobulk(cells, path, chunk_size=7)

    expected = (
        pd.DataFrame(x[cells[counts.MATRIX_ROW].to_numpy()])
        .groupby([cells["patient_id"].to_numpy(), cells["cell_type"].to_numpy()])
        .sum()
    )
    assert list(zip(pb.groups["patient_id"], pb.groups["cell_type"], strict=True)) == list(
        expected.index
    )
    np.testing.assert_array_equal(pb.sums, expected.to_numpy())
    assert pb.sums.dtype == np.float64
    sizes = cells.groupby(["patient_id", "cell_type"]).size()
    assert pb.groups["n_cells"].tolist() == sizes.tolist()
    assert list(pb.genes) == [f"ENSG{g:011d}" for g in range(x.shape[1])]


def test_pseudobulk_does_not_depend_on_chunk_size(count_matrix: tuple[Path, np.ndarray]) -> None:
    path, x = count_matrix
    cells = _cell_table(len(x), 50, seed=2)
    results = [features.pseudobulk(cells, path, chunk_size=c) for c in (1, 3, 1000)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.sums, results[0].sums)
        pd.testing.assert_frame_equal(other.groups, results[0].groups)


def test_per_donor_is_the_sum_over_cell_types(count_matrix: tuple[Path, np.ndarray]) -> None:
    path, x = count_matrix
    cells = _cell_table(len(x), 60, seed=3)
    pb = features.pseudobulk(cells, path, chunk_size=16)
    donors = ["D3", "D1", "absent", "D4", "D2"]  # rows follow this order
    per_donor = pb.per_donor(donors)
    assert per_donor.shape == (5, x.shape[1])
    for row, donor in enumerate(donors):
        mine = cells[counts.MATRIX_ROW][cells["patient_id"] == donor].to_numpy()
        np.testing.assert_array_equal(per_donor[row], x[mine].sum(axis=0))
    assert not per_donor[2].any()  # a donor without cells sums to zeros


def test_pseudobulk_refuses_non_integer_counts(tmp_path: Path) -> None:
    x = np.ones((12, 4))
    x[5, 2] = 0.5
    path = _write_matrix(tmp_path / "normalised.h5ad", x)
    cells = _cell_table(12, 12, seed=0)
    with pytest.raises(InputError, match="non-integer"):
        features.pseudobulk(cells, path, chunk_size=4)


# --------------------------------------------------------------------------------------------
# features: log CPM, genes, feature blocks, proportions


def _pseudobulk(sums: list[list[float]], groups: list[tuple[str, str, int]]) -> features.Pseudobulk:
    return features.Pseudobulk(
        sums=np.asarray(sums, dtype=np.float64),
        groups=pd.DataFrame(groups, columns=["patient_id", "cell_type", "n_cells"]),
        genes=pd.Index([f"G{i}" for i in range(len(sums[0]))]),
    )


def test_log_cpm_hand_example() -> None:
    out = features.log_cpm(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(out[0], np.log1p([250_000.0, 750_000.0, 0.0]))
    np.testing.assert_array_equal(out[1], [0.0, 0.0, 0.0])


def test_expressed_genes_reads_only_the_given_donors() -> None:
    pb = _pseudobulk(
        [[999_000, 1_000, 0, 0], [1_000_000, 0, 0, 0], [500_000, 0, 0, 500_000]],
        [("A", "Exc", 5), ("B", "Exc", 5), ("C", "Exc", 5)],
    )
    # Mean CPM over A and B: G0 999,500, G1 500, G2 0, G3 0.
    assert features.expressed_genes(pb, ["A", "B"], min_cpm=100.0).tolist() == [0, 1]
    assert features.expressed_genes(pb, ["A", "B"], min_cpm=600.0).tolist() == [0]
    # With C, G3 has a mean CPM of 166,667.
    assert features.expressed_genes(pb, ["A", "B", "C"], min_cpm=600.0).tolist() == [0, 3]


def test_pseudobulk_features_per_donor() -> None:
    pb = _pseudobulk(
        [[10, 0, 30], [5, 5, 0], [0, 8, 2]],
        [("A", "Exc", 4), ("A", "Mic", 1), ("B", "Exc", 6)],
    )
    frame, report = features.pseudobulk_features(pb, ["B", "A"], genes=np.array([0, 2]))
    expected = features.log_cpm(np.array([[0, 8, 2], [15, 5, 30]], dtype=np.float64))[:, [0, 2]]
    np.testing.assert_allclose(frame.to_numpy(), expected)
    assert list(frame.index) == ["B", "A"]
    assert list(frame.columns) == ["G0", "G2"]
    assert report == {"features": 2}


def test_pseudobulk_features_per_cell_type_mark_small_groups_missing() -> None:
    pb = _pseudobulk(
        [[10, 0, 30], [5, 5, 0], [0, 8, 2], [1, 1, 1]],
        [("A", "Exc", 4), ("A", "Mic", 1), ("B", "Exc", 6), ("C", "Ast", 2)],
    )
    frame, report = features.pseudobulk_features(
        pb, ["A", "B", "C"], genes=np.array([0, 1]), cell_types=["Ast", "Exc", "Mic"], min_cells=3
    )
    # Ast: only C, with 2 < 3 cells, so the block is empty everywhere and dropped. Mic: only A,
    # with 1 cell: dropped too. Exc: A and B have enough cells, C has none.
    assert list(frame.columns) == ["Exc|G0", "Exc|G1"]
    np.testing.assert_allclose(
        frame.loc[["A", "B"]].to_numpy(), features.log_cpm(pb.sums[[0, 2]])[:, [0, 1]]
    )
    assert frame.loc["C"].isna().all()
    assert report["missing"] == {"Ast": 3, "Exc": 1, "Mic": 3}
    assert report["features"] == 2

    frame, report = features.pseudobulk_features(
        pb, ["A", "B", "C"], genes=np.array([0, 1]), cell_types=["Exc", "Mic"], min_cells=1
    )
    assert list(frame.columns) == ["Exc|G0", "Exc|G1", "Mic|G0", "Mic|G1"]
    assert frame.loc["A", ["Mic|G0", "Mic|G1"]].notna().all()
    assert frame.loc[["B", "C"], ["Mic|G0", "Mic|G1"]].isna().all().all()
    assert report["missing"] == {"Exc": 1, "Mic": 2}


def test_proportions_rows_sum_to_one() -> None:
    cells = pd.DataFrame(
        {
            "patient_id": ["A", "A", "A", "A", "B", "B"],
            "cell_type": ["Exc", "Exc", "Mic", "Ast", "Mic", "Mic"],
        }
    )
    shares = features.proportions(cells, ["B", "A"])
    assert list(shares.index) == ["B", "A"]
    assert list(shares.columns) == ["Ast", "Exc", "Mic"]
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    np.testing.assert_allclose(shares.loc["A"], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(shares.loc["B"], [0.0, 0.0, 1.0])


# --------------------------------------------------------------------------------------------
# features: donors


def _annotated(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": [r[0] for r in rows],
            "ad_status": [r[1] for r in rows],
            "split": [r[2] for r in rows],
            "cell_type": "Exc",
        }
    )


def test_donor_table_one_row_per_donor() -> None:
    cells = _annotated(
        [
            ("P2", "AD", "train"),
            ("P1", "control", "val"),
            ("P2", "AD", "train"),
            ("P3", "AD", "test"),
        ]
    )
    donors = features.donor_table(cells, positive_class="AD")
    assert list(donors.index) == ["P1", "P2", "P3"]
    assert donors.index.name == "patient_id"
    assert donors["label"].tolist() == [0, 1, 1]
    assert donors["n_cells"].tolist() == [1, 2, 1]
    assert donors["split"].tolist() == ["val", "train", "test"]


def test_donor_table_refuses_a_donor_with_two_labels() -> None:
    cells = _annotated([("P1", "AD", "train"), ("P1", "control", "train"), ("P2", "AD", "val")])
    with pytest.raises(InputError, match=r"\['P1'\].*different ad_status"):
        features.donor_table(cells, positive_class="AD")


def test_donor_table_refuses_an_absent_positive_class() -> None:
    cells = _annotated([("P1", "control", "train"), ("P2", "MCI", "val")])
    with pytest.raises(InputError, match=r"positive_class='AD' is not an ad_status of any donor"):
        features.donor_table(cells, positive_class="AD")


def _write_split(path: Path, donors: list[str]) -> None:
    table = pd.DataFrame(
        {
            "patient_id": donors,
            "cell_type": "Exc",
            "ad_status": "AD",
            counts.MATRIX_ROW: np.arange(len(donors), dtype=np.int64),
        },
        index=[f"{path.stem}{i}" for i in range(len(donors))],
    )
    counts.write_cells(table, path)


def test_read_annotated_stacks_the_splits(tmp_path: Path) -> None:
    _write_split(tmp_path / "train.parquet", ["P1", "P1", "P2"])
    _write_split(tmp_path / "test.parquet", ["P3"])
    cells = features.read_annotated(
        {"train": tmp_path / "train.parquet", "test": tmp_path / "test.parquet"}
    )
    assert cells["split"].tolist() == ["train", "train", "train", "test"]
    assert cells["patient_id"].tolist() == ["P1", "P1", "P2", "P3"]
    assert set(features.CELL_COLUMNS) <= set(cells.columns)


def test_read_annotated_refuses_a_donor_in_two_splits(tmp_path: Path) -> None:
    _write_split(tmp_path / "train.parquet", ["P1", "P2"])
    _write_split(tmp_path / "val.parquet", ["P3", "P2"])
    with pytest.raises(InputError, match=r"\['P2'\] appear in more than one split"):
        features.read_annotated(
            {"train": tmp_path / "train.parquet", "val": tmp_path / "val.parquet"}
        )


def test_read_annotated_refuses_a_table_without_cell_types(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {"patient_id": ["P1"], "ad_status": ["AD"], counts.MATRIX_ROW: [0]}, index=["c0"]
    )
    counts.write_cells(table, tmp_path / "train.parquet")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['cell_type'\]"):
        features.read_annotated({"train": tmp_path / "train.parquet"})


# --------------------------------------------------------------------------------------------
# crossval: folds, thresholds, pooled scores


def test_donor_folds_hold_out_every_donor_once_per_repeat() -> None:
    ids = [f"D{i:02d}" for i in range(22)]
    labels = np.array([1] * 9 + [0] * 13)
    donors = _donor_frame(ids, labels).sample(frac=1.0, random_state=0)  # any row order
    folds = crossval.donor_folds(donors, n_splits=4, n_repeats=3, seed=7)
    assert len(folds) == 12
    label_of = dict(zip(ids, labels, strict=True))
    for repeat in range(3):
        mine = [f for f in folds if f.repeat == repeat]
        assert [f.fold for f in mine] == [0, 1, 2, 3]
        held = [d for f in mine for d in f.held_out]
        assert sorted(held) == ids  # each donor exactly once
        for fold in mine:
            assert not set(fold.train) & set(fold.held_out)
            assert sorted(fold.train + fold.held_out) == ids
            held_labels = [label_of[d] for d in fold.held_out]
            assert set(held_labels) == {0, 1}
            assert sum(held_labels) in (2, 3)  # 9 positives over 4 folds
    # The folds of a repeat differ from those of the next.
    assert {f.held_out for f in folds if f.repeat == 0} != {
        f.held_out for f in folds if f.repeat == 1
    }


def test_donor_folds_are_seeded() -> None:
    ids = [f"D{i:02d}" for i in range(20)]
    donors = _donor_frame(ids, _labels(20))
    first = crossval.donor_folds(donors, n_splits=5, n_repeats=2, seed=1)
    assert first == crossval.donor_folds(donors.iloc[::-1], n_splits=5, n_repeats=2, seed=1)
    assert first != crossval.donor_folds(donors, n_splits=5, n_repeats=2, seed=2)


def test_donor_folds_refuse_too_few_donors_of_a_class() -> None:
    donors = _donor_frame([f"D{i}" for i in range(10)], np.array([1, 1, 1] + [0] * 7))
    with pytest.raises(InputError, match=r"donor\.cv\.n_splits=4.*only 3 donor"):
        crossval.donor_folds(donors, n_splits=4, n_repeats=1, seed=0)


def test_youden_threshold_hand_examples() -> None:
    labels = np.array([0, 1, 0, 1])
    assert crossval.youden_threshold(labels, np.array([0.2, 0.9, 0.5, 0.6])) == pytest.approx(0.6)
    # Cut 0.7: sensitivity 2/3, specificity 1; cut 0.4: sensitivity 1, specificity 2/3. Same
    # Youden J; the tie goes to the higher cut.
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.8])
    assert crossval.youden_threshold(labels, scores) == pytest.approx(0.7)
    assert crossval.youden_threshold(np.ones(4, dtype=int), np.arange(4.0)) is None


def _oof() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": ["m"] * 8 + ["other"] * 2,
            "repeat": [0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
            "fold": [0, 0, 1, 1, 0, 0, 1, 1, 0, 0],
            "patient_id": ["B", "A", "C", "D", "A", "C", "B", "D", "A", "B"],
            "label": [1, 0, 1, 0, 0, 1, 1, 0, 0, 1],
            "score": [0.8, 0.3, 0.2, 0.6, 0.5, 0.4, 0.6, 0.2, 0.9, 0.1],
        }
    )


def test_pooled_oof_averages_each_donor_over_repeats() -> None:
    pooled = crossval.pooled_oof(_oof(), "m")
    assert pooled["patient_id"].tolist() == ["A", "B", "C", "D"]
    assert pooled["label"].tolist() == [0, 1, 1, 0]
    np.testing.assert_allclose(pooled["score"], [0.4, 0.7, 0.3, 0.4])


def test_fold_aurocs_one_per_fold() -> None:
    oof = _oof()
    # A fold with one class has no AUROC.
    oof = pd.concat(
        [
            oof,
            pd.DataFrame(
                [
                    {
                        "method": "m",
                        "repeat": 2,
                        "fold": 0,
                        "patient_id": "A",
                        "label": 0,
                        "score": 0.1,
                    }
                ]
            ),
        ]
    )
    table = crossval.fold_aurocs(oof, "m")
    assert table[["repeat", "fold"]].values.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    # (B 0.8 > A 0.3), (C 0.2 < D 0.6), (C 0.4 < A 0.5), (B 0.6 > D 0.2)
    assert table["auroc"].tolist() == [1.0, 0.0, 0.0, 1.0]


# --------------------------------------------------------------------------------------------
# methods: feature and cell logistic regressions


def _feature_donors(n: int, *, signal: float, seed: int) -> pd.DataFrame:
    """``n`` donors x 60 features; AD donors (odd rows) are shifted by ``signal`` in 4 features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (n, 60))
    x[_labels(n) == 1, :4] += signal
    ids = [f"D{i:03d}" for i in range(n)]
    return pd.DataFrame(
        x, index=pd.Index(ids, name="patient_id"), columns=[f"g{j}" for j in range(60)]
    )


def _cross_validate(
    method_list: list, donors: pd.DataFrame, *, n_cv: int, seed: int = 0
) -> crossval.DonorScores:
    ids = donors.index.tolist()
    folds = crossval.donor_folds(donors.loc[ids[:n_cv]], n_splits=4, n_repeats=1, seed=seed)
    return crossval.run_methods(
        method_list, donors, folds=folds, cv_donors=ids[:n_cv], test_donors=ids[n_cv:], seed=seed
    )


def _pseudobulk_method(frame: pd.DataFrame, **options: object) -> methods.FeatureLogistic:
    settings = {"C": [0.1, 1.0], "l1_ratio": 0.0, "n_top": 20, **options}
    return methods.FeatureLogistic("pseudobulk", "synthetic", features=frame, **settings)


def test_feature_logistic_finds_a_few_informative_features() -> None:
    frame = _feature_donors(56, signal=2.0, seed=0)
    donors = _donor_frame(frame.index.tolist(), _labels(56))
    method = _pseudobulk_method(frame)
    scores = _cross_validate([method], donors, n_cv=40)
    metrics, thresholds = crossval.summarize(scores, [method], reference=None, n_boot=100, seed=0)
    entry = metrics["pseudobulk"]
    assert entry["cv_pooled_auroc"] > 0.9
    assert entry["cv_auroc"] > 0.85
    assert entry["test_auroc"] > 0.9
    assert len(scores.oof) == 40 and len(scores.test) == 16
    assert ((scores.oof["score"] > 0) & (scores.oof["score"] < 1)).all()
    # One penalty chosen per fit (4 folds and the test refit), from the grid.
    assert len(method.chosen) == 5
    assert {c["C"] for c in method.chosen} <= {0.1, 1.0}
    assert thresholds["pseudobulk"] == entry["threshold"]


def test_feature_logistic_with_lasso_also_finds_them() -> None:
    frame = _feature_donors(48, signal=1.5, seed=1)
    donors = _donor_frame(frame.index.tolist(), _labels(48))
    method = _pseudobulk_method(frame, l1_ratio=1.0, C=[0.1, 1.0], n_top=None)
    scores = _cross_validate([method], donors, n_cv=40)
    pooled = crossval.pooled_oof(scores.oof, "pseudobulk")
    assert roc_auc_score(pooled["label"], pooled["score"]) > 0.85


def test_feature_logistic_on_noise_is_near_chance() -> None:
    frame = _feature_donors(88, signal=0.0, seed=2)
    donors = _donor_frame(frame.index.tolist(), _labels(88))
    method = _pseudobulk_method(frame)
    scores = _cross_validate([method], donors, n_cv=80)
    pooled = crossval.pooled_oof(scores.oof, "pseudobulk")
    assert 0.25 < roc_auc_score(pooled["label"], pooled["score"]) < 0.75


def test_feature_logistic_is_seeded() -> None:
    frame = _feature_donors(40, signal=0.8, seed=3)
    donors = _donor_frame(frame.index.tolist(), _labels(40))
    first = _cross_validate([_pseudobulk_method(frame)], donors, n_cv=32, seed=5)
    second = _cross_validate([_pseudobulk_method(frame)], donors, n_cv=32, seed=5)
    assert first.oof["score"].to_numpy().tobytes() == second.oof["score"].to_numpy().tobytes()
    assert first.test["score"].to_numpy().tobytes() == second.test["score"].to_numpy().tobytes()
    pd.testing.assert_frame_equal(first.oof, second.oof)


def test_feature_logistic_chooses_features_on_the_training_donors_only() -> None:
    # "leak" is constant on the training donors and wild on the scored ones: chosen on all
    # donors it would have the highest variance; chosen inside the fit it is never read.
    rng = np.random.default_rng(4)
    labels = _labels(30)
    frame = pd.DataFrame(
        {
            "signal": labels + rng.normal(0.0, 0.5, 30),
            "noise": rng.normal(0.0, 0.3, 30),
            "leak": 0.0,
        },
        index=pd.Index([f"D{i:02d}" for i in range(30)], name="patient_id"),
    )
    train, held_out = frame.index[:20].tolist(), frame.index[20:].tolist()
    scored = []
    for leak in (0.0, 1000.0, -1000.0):
        frame.loc[held_out, "leak"] = rng.normal(leak, 100.0, 10)
        method = _pseudobulk_method(frame, n_top=1)
        scored.append(method.fit_score(train, labels[:20], held_out, seed=0).scores)
    np.testing.assert_array_equal(scored[0], scored[1])
    np.testing.assert_array_equal(scored[0], scored[2])
    # The one feature read is the signal: the scores follow it on the held-out donors.
    assert roc_auc_score(labels[20:], scored[0]) == pytest.approx(
        roc_auc_score(labels[20:], frame.loc[held_out, "signal"])
    )


@pytest.mark.parametrize("per_block", [False, True])
def test_feature_logistic_imputes_missing_blocks(per_block: bool) -> None:
    frame = _feature_donors(32, signal=2.0, seed=5)
    frame.iloc[::5, :10] = np.nan  # donors missing a block
    frame.iloc[:24, 50] = np.nan  # a feature no training donor has
    frame.iloc[1:24, 51] = np.nan  # one training donor has it: empty in most inner splits
    donors = _donor_frame(frame.index.tolist(), _labels(32))
    blocks = ["a" if j < 30 else "b" for j in range(frame.shape[1])] if per_block else None
    method = _pseudobulk_method(frame, n_top=20 if per_block else None, blocks=blocks)
    scored = method.fit_score(
        frame.index[:24].tolist(), _labels(32)[:24], frame.index[24:].tolist(), seed=0
    )
    assert np.isfinite(scored.scores).all()
    assert roc_auc_score(donors["label"].iloc[24:], scored.scores) > 0.8
    assert all(np.isfinite(choice["inner_auroc"]) for choice in method.chosen)


def _blocked_donors(n: int, seed: int) -> pd.DataFrame:
    """A "big" cell type whose 4 signal genes vary little, beside a "small" one whose 20 genes
    are loud noise (the pseudobulks of a few cells): the shape that misled a global cut."""
    rng = np.random.default_rng(seed)
    big = rng.normal(0.0, 0.3, (n, 20))
    big[_labels(n) == 1, :4] += 0.6
    small = rng.normal(0.0, 3.0, (n, 20))
    columns = [f"big|g{j}" for j in range(20)] + [f"small|g{j}" for j in range(20)]
    ids = [f"D{i:03d}" for i in range(n)]
    return pd.DataFrame(
        np.hstack([big, small]), index=pd.Index(ids, name="patient_id"), columns=columns
    )


def test_feature_logistic_takes_the_top_genes_of_every_block() -> None:
    frame = _blocked_donors(40, seed=6)
    blocks = [column.split("|")[0] for column in frame.columns]
    method = _pseudobulk_method(frame, n_top=5, blocks=blocks)
    labels = _labels(40)
    pipeline = method.pipeline(np.ones(frame.shape[1], dtype=bool), seed=0)
    pipeline.fit(frame.to_numpy(), labels)
    kept = frame.columns[pipeline.named_steps["top_variance_per_block"].get_support()]
    variance = frame.var(ddof=0)
    expected = [
        *variance.filter(like="big|").nlargest(5).index,
        *variance.filter(like="small|").nlargest(5).index,
    ]
    assert sorted(kept) == sorted(expected)
    # A single cut over all columns takes only the loud block.
    single = _pseudobulk_method(frame, n_top=10).pipeline(np.ones(frame.shape[1], bool), seed=0)
    single.fit(frame.to_numpy(), labels)
    chosen = frame.columns[single.named_steps["top_variance"].get_support()]
    assert all(column.startswith("small|") for column in chosen)


def test_feature_logistic_per_block_finds_the_quiet_signal() -> None:
    frame = _blocked_donors(72, seed=7)
    donors = _donor_frame(frame.index.tolist(), _labels(72))
    blocks = [column.split("|")[0] for column in frame.columns]
    per_block = _pseudobulk_method(frame, n_top=10, blocks=blocks)
    single = _pseudobulk_method(frame, n_top=10)
    single.name = "single_cut"
    scores = _cross_validate([per_block, single], donors, n_cv=56)
    pooled = {m: crossval.pooled_oof(scores.oof, m) for m in ("pseudobulk", "single_cut")}
    auroc = {m: roc_auc_score(f["label"], f["score"]) for m, f in pooled.items()}
    assert auroc["pseudobulk"] > 0.85
    assert auroc["single_cut"] < 0.75


def _cell_embeddings(
    n_donors: int, *, shift: float, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """20 cells x 6 dimensions per donor; AD donors' (odd) cells are shifted in dimension 0."""
    rng = np.random.default_rng(seed)
    ids = [f"D{i:02d}" for i in range(n_donors)]
    donor_of = np.repeat(ids, 20)
    x = rng.normal(0.0, 1.0, (len(donor_of), 6))
    x[np.repeat(_labels(n_donors), 20) == 1, 0] += shift
    x += np.repeat(rng.normal(0.0, 0.2, (n_donors, 6)), 20, axis=0)  # a donor effect
    return x, donor_of, ids


def test_cell_logistic_scores_donors_from_their_cells() -> None:
    x, donor_of, ids = _cell_embeddings(32, shift=1.0, seed=0)
    method = methods.CellLogistic(
        "cell_classifier", "synthetic", embeddings=x, donors=donor_of, C=[0.1, 1.0]
    )
    donors = _donor_frame(ids, _labels(32))
    scores = _cross_validate([method], donors, n_cv=24)
    pooled = crossval.pooled_oof(scores.oof, "cell_classifier")
    assert roc_auc_score(pooled["label"], pooled["score"]) > 0.9
    assert roc_auc_score(scores.test["label"], scores.test["score"]) > 0.9
    assert len(method.chosen) == 5


def test_mean_per_donor_averages_cells_and_gives_nan_without_cells() -> None:
    x, donor_of, _ = _cell_embeddings(6, shift=1.0, seed=1)
    model = LogisticRegression().fit(x, np.repeat(_labels(6), 20))
    means = methods.mean_per_donor(x, donor_of, ["D03", "nobody", "D00"], model)
    p = model.predict_proba(x)[:, 1]
    assert means[0] == pytest.approx(p[donor_of == "D03"].mean())
    assert np.isnan(means[1])
    assert means[2] == pytest.approx(p[donor_of == "D00"].mean())
    assert np.isnan(methods.mean_per_donor(x, donor_of, ["nobody"], model)).all()


# --------------------------------------------------------------------------------------------
# MIL


def _bags(n_donors: int, *, seed: int) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """24 cells x 8 dimensions per donor, in three cell types (Mic the rarest); AD donors' (odd)
    Mic cells, and only those, are shifted."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (3, 8))
    ids = [f"D{i:02d}" for i in range(n_donors)]
    blocks, rows = [], []
    for donor, label in zip(ids, _labels(n_donors), strict=True):
        types = rng.choice(3, 24, p=[0.45, 0.4, 0.15])
        x = centres[types] + rng.normal(0.0, 1.0, (24, 8))
        if label:
            x[types == 2, :2] += 2.5
        blocks.append(x)
        rows += [
            {"cell_id": f"{donor}_{j}", "patient_id": donor, "cell_type": TYPES[t]}
            for j, t in enumerate(types)
        ]
    return np.vstack(blocks), pd.DataFrame(rows), ids


def _mil(x: np.ndarray, cells: pd.DataFrame, **options: object) -> mil.AttentionMIL:
    settings = mil.MILSettings(
        **{"att_dim": 16, "epochs": 30, "learning_rate": 5e-3, "batch_size": 4, **options}
    )
    return mil.AttentionMIL("mil_base", "synthetic", embeddings=x, cells=cells, settings=settings)


@pytest.fixture(scope="module")
def mil_run() -> tuple[crossval.DonorScores, pd.DataFrame]:
    x, cells, ids = _bags(36, seed=0)
    donors = _donor_frame(ids, _labels(36))
    method = _mil(x, cells, max_cells_per_donor=20)
    return _cross_validate([method], donors, n_cv=24), cells


def test_mil_scores_held_out_donors(mil_run: tuple[crossval.DonorScores, pd.DataFrame]) -> None:
    scores, _ = mil_run
    pooled = crossval.pooled_oof(scores.oof, "mil_base")
    assert len(pooled) == 24
    # Chance is 0.5; a donor-level signal in 15% of the cells is read clearly.
    assert roc_auc_score(pooled["label"], pooled["score"]) > 0.75
    assert roc_auc_score(scores.test["label"], scores.test["score"]) > 0.75
    assert ((scores.test["score"] >= 0) & (scores.test["score"] <= 1)).all()


def test_mil_attention_sums_to_one_per_donor(
    mil_run: tuple[crossval.DonorScores, pd.DataFrame],
) -> None:
    scores, cells = mil_run
    attention = scores.cells
    assert set(attention["method"]) == {"mil_base"}
    assert sorted(attention["patient_id"].unique()) == sorted(scores.test["patient_id"])
    assert (attention["attention"] >= 0).all()
    np.testing.assert_allclose(attention.groupby("patient_id")["attention"].sum(), 1.0, atol=1e-5)
    # Bags hold at most max_cells_per_donor cells, each a real cell of that donor.
    assert attention.groupby("patient_id").size().max() == 20
    known = cells.set_index("cell_id")
    assert (
        known.loc[attention["cell_id"], "patient_id"].to_numpy() == attention["patient_id"]
    ).all()
    assert (known.loc[attention["cell_id"], "cell_type"].to_numpy() == attention["cell_type"]).all()


def test_mil_attention_points_at_the_signal_cell_type(
    mil_run: tuple[crossval.DonorScores, pd.DataFrame],
) -> None:
    scores, _ = mil_run
    table = mil.attention_by_cell_type(scores.cells).set_index("cell_type")
    assert table.loc["Mic", "enrichment"] > 1.0
    assert table.loc["Mic", "enrichment"] > table.drop(index="Mic")["enrichment"].max()
    assert table["attention_share"].sum() == pytest.approx(1.0, abs=1e-5)
    assert table["cell_share"].sum() == pytest.approx(1.0)


def test_attention_by_cell_type_hand_example() -> None:
    cells = pd.DataFrame(
        {
            "patient_id": ["A", "A", "A", "A", "B", "B"],
            "cell_type": ["Exc", "Exc", "Exc", "Mic", "Exc", "Mic"],
            "attention": [0.1, 0.1, 0.1, 0.7, 0.5, 0.5],
        }
    )
    table = mil.attention_by_cell_type(cells).set_index("cell_type")
    # Mic: cell shares 1/4 and 1/2 (mean 3/8), attention 0.7 and 0.5 (mean 0.6).
    assert table.loc["Mic", "cell_share"] == pytest.approx(3 / 8)
    assert table.loc["Mic", "attention_share"] == pytest.approx(0.6)
    assert table.loc["Mic", "enrichment"] == pytest.approx(0.6 / (3 / 8))
    assert table.loc["Exc", "enrichment"] == pytest.approx(0.4 / (5 / 8))
    assert table.index.tolist() == ["Mic", "Exc"]  # most enriched first


def test_mil_is_seeded() -> None:
    x, cells, ids = _bags(12, seed=1)
    labels = _labels(12)
    runs = [
        _mil(x, cells, epochs=3, max_cells_per_donor=10).fit_score(
            ids[:8], labels[:8], ids[8:], seed=3
        )
        for _ in range(2)
    ]
    assert runs[0].scores.tobytes() == runs[1].scores.tobytes()
    pd.testing.assert_frame_equal(runs[0].cells, runs[1].cells)
    other = _mil(x, cells, epochs=3, max_cells_per_donor=10).fit_score(
        ids[:8], labels[:8], ids[8:], seed=4
    )
    assert other.scores.tobytes() != runs[0].scores.tobytes()


def test_mil_gives_a_donor_without_cells_no_score() -> None:
    x, cells, ids = _bags(8, seed=2)
    # A training donor without cells trains nothing; a scored one gets NaN (the prior, later).
    scored = _mil(x, cells, epochs=1).fit_score(
        [*ids, "nobody"], np.append(_labels(8), 1), ["nobody", ids[0]], seed=0
    )
    assert np.isnan(scored.scores[0]) and np.isfinite(scored.scores[1])
    assert set(scored.cells["patient_id"]) == {ids[0]}


# --------------------------------------------------------------------------------------------
# summarize: metrics of every method, thresholds, paired comparison


@pytest.fixture(scope="module")
def summary() -> tuple[crossval.DonorScores, list, dict, dict]:
    rng = np.random.default_rng(6)
    n = 48
    frame = _feature_donors(n, signal=1.2, seed=6)
    ids = frame.index.tolist()
    labels = _labels(n)
    donors = _donor_frame(ids, labels)
    cv, test, val = ids[:36], ids[36:], ids[24:36]
    shares = pd.DataFrame(
        {"Exc": 0.5 + 0.05 * labels + rng.normal(0, 0.05, n)}, index=frame.index
    ).assign(Mic=lambda t: 1 - t["Exc"])
    # A fine-tuned model's scores, on another scale than probabilities, for val and test only.
    finetuned = pd.Series(3.0 + labels + rng.normal(0.0, 0.6, n), index=ids).loc[val + test]
    method_list = [
        methods.PrecomputedScores("finetuned_mean_p", "synthetic", finetuned),
        methods.FeatureLogistic(
            "proportions", "synthetic", features=shares, C=[0.1, 1.0], l1_ratio=0.0
        ),
        _pseudobulk_method(frame),
    ]
    folds = crossval.donor_folds(donors.loc[cv], n_splits=4, n_repeats=2, seed=0)
    scores = crossval.run_methods(
        method_list, donors, folds=folds, cv_donors=cv, test_donors=test, val_donors=val, seed=0
    )
    metrics, thresholds = crossval.summarize(
        scores, method_list, reference="pseudobulk", n_boot=200, seed=0
    )
    return scores, method_list, metrics, thresholds


def test_run_methods_scores_each_method_where_it_belongs(
    summary: tuple[crossval.DonorScores, list, dict, dict],
) -> None:
    scores, _, _, _ = summary
    # Cross-validated methods: every CV donor once per repeat; the precomputed one: none.
    assert set(scores.oof["method"]) == {"proportions", "pseudobulk"}
    assert (scores.oof.groupby(["method", "patient_id"]).size() == 2).all()
    assert scores.oof["patient_id"].nunique() == 36
    assert (scores.test.groupby("method").size() == 12).all()
    assert set(scores.val["method"]) == {"finetuned_mean_p"}
    assert len(scores.val) == 12
    assert scores.cells.empty


def test_summarize_reports_every_metric(
    summary: tuple[crossval.DonorScores, list, dict, dict],
) -> None:
    scores, _, metrics, thresholds = summary
    assert set(metrics) == {"finetuned_mean_p", "proportions", "pseudobulk"}
    for name, entry in metrics.items():
        for key in (
            "threshold",
            "test_auroc",
            "test_auroc_ci_low",
            "test_auroc_ci_high",
            "test_balanced_accuracy",
            "test_accuracy",
        ):
            assert key in entry, (name, key)
        assert entry["test_auroc_ci_low"] <= entry["test_auroc"] <= entry["test_auroc_ci_high"]
        assert thresholds[name] == entry["threshold"]
    for name in ("proportions", "pseudobulk"):
        entry = metrics[name]
        assert entry["cross_validated"] is True
        for key in ("cv_auroc", "cv_auroc_sd", "cv_pooled_auroc", "cv_pooled_auroc_ci_low"):
            assert isinstance(entry[key], float), (name, key)
        per_fold = crossval.fold_aurocs(scores.oof, name)
        assert len(per_fold) == 8
        assert entry["cv_auroc"] == pytest.approx(per_fold["auroc"].mean())
        assert entry["cv_auroc_sd"] == pytest.approx(per_fold["auroc"].std(ddof=1))
        pooled = crossval.pooled_oof(scores.oof, name)
        assert entry["cv_pooled_auroc"] == pytest.approx(
            roc_auc_score(pooled["label"], pooled["score"])
        )
    assert metrics["pseudobulk"]["cv_pooled_auroc"] > 0.85

    # The paired comparisons with the reference, and none of the reference with itself.
    proportions = metrics["proportions"]
    for key in ("p_value", "difference", "ci_low", "ci_high"):
        assert f"cv_vs_pseudobulk_{key}" in proportions
        assert f"test_vs_pseudobulk_{key}" in proportions
        assert f"test_vs_pseudobulk_{key}" in metrics["finetuned_mean_p"]
    assert not any(k.startswith(("cv_vs_", "test_vs_")) for k in metrics["pseudobulk"])
    assert not any(k.startswith("cv_") for k in metrics["finetuned_mean_p"])
    test = scores.test.pivot(index="patient_id", columns="method", values="score")
    labels = scores.test.groupby("patient_id")["label"].first().loc[test.index]
    assert metrics["finetuned_mean_p"]["test_vs_pseudobulk_difference"] == pytest.approx(
        roc_auc_score(labels, test["finetuned_mean_p"]) - roc_auc_score(labels, test["pseudobulk"])
    )
    assert 0.0 < proportions["cv_vs_pseudobulk_p_value"] <= 1.0


def test_summarize_thresholds_come_from_training_donors(
    summary: tuple[crossval.DonorScores, list, dict, dict],
) -> None:
    scores, _, metrics, thresholds = summary
    # The precomputed method's cut: Youden's on the val donors (its scores are around 3-4).
    val = scores.val
    assert thresholds["finetuned_mean_p"] == crossval.youden_threshold(
        val["label"].to_numpy(), val["score"].to_numpy()
    )
    assert thresholds["finetuned_mean_p"] > 2.0
    assert "val donors" in metrics["finetuned_mean_p"]["threshold_from"]
    # The cross-validated ones: Youden's on their pooled out-of-fold scores.
    for name in ("proportions", "pseudobulk"):
        pooled = crossval.pooled_oof(scores.oof, name)
        assert thresholds[name] == crossval.youden_threshold(
            pooled["label"].to_numpy(), pooled["score"].to_numpy()
        )
        assert thresholds[name] != 0.5
    # Balanced accuracy on test is read at that cut.
    test = scores.test[scores.test["method"] == "finetuned_mean_p"]
    called = test["score"] >= thresholds["finetuned_mean_p"]
    recalls = [called[test["label"] == 1].mean(), (~called)[test["label"] == 0].mean()]
    assert metrics["finetuned_mean_p"]["test_balanced_accuracy"] == pytest.approx(np.mean(recalls))


def test_summarize_gives_donors_without_a_score_the_prior() -> None:
    ids = [f"D{i}" for i in range(8)]
    labels = _labels(8)
    donors = _donor_frame(ids, labels)
    scores = pd.Series([0.1, 0.9, 0.2, 0.8, 0.3, np.nan, 0.1, 0.7], index=ids)
    method = methods.PrecomputedScores("finetuned_mean_p", "synthetic", scores)
    run = crossval.run_methods(
        [method], donors, folds=[], cv_donors=ids[:4], test_donors=ids[4:], val_donors=ids[:4]
    )
    metrics, _ = crossval.summarize(run, [method], reference=None, n_boot=50, seed=0)
    assert metrics["finetuned_mean_p"]["test_donors_without_score"] == 1
    assert metrics["finetuned_mean_p"]["val_donors_without_score"] == 0
    # D5 (AD) gets the val prior 0.5: below 0.7 (AD), above 0.3 and 0.1 (controls).
    assert metrics["finetuned_mean_p"]["test_auroc"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# figures


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_figures_save_as_png(
    tmp_path: Path, summary: tuple[crossval.DonorScores, list, dict, dict]
) -> None:
    scores, method_list, _, thresholds = summary
    pooled = {
        m.name: crossval.pooled_oof(scores.oof, m.name) for m in method_list if m.cross_validated
    }
    test = {m.name: scores.test[scores.test["method"] == m.name] for m in method_list}

    fig = plots.roc_figure(pooled, test)
    assert len(fig.axes) == 2
    # One curve per method and the diagonal, in each panel.
    assert len(fig.axes[0].lines) == len(pooled) + 1
    assert len(fig.axes[1].lines) == len(test) + 1
    io.save_figure(fig, tmp_path / "roc.png")

    fig = plots.donor_scores_figure(pooled, test, thresholds, classes=["control", "AD"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(test)
    io.save_figure(fig, tmp_path / "donor_scores.png")

    attention = pd.DataFrame(
        {
            "method": ["mil_base", "mil_base", "mil_finetuned", "mil_finetuned"],
            "cell_type": ["Exc", "Mic", "Exc", "Mic"],
            "cell_share": [0.8, 0.2, 0.8, 0.2],
            "attention_share": [0.4, 0.6, 0.8, 0.2],
            "enrichment": [0.5, 3.0, 1.0, 1.0],
        }
    )
    fig = plots.attention_figure(attention)
    assert len(fig.axes) == 2
    io.save_figure(fig, tmp_path / "attention.png")

    for name in ("roc.png", "donor_scores.png", "attention.png"):
        assert _is_png(tmp_path / name), name
