from __future__ import annotations

import pickle
import subprocess
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import sparse, stats
from transformers import BertForSequenceClassification, BertModel

from builders import (
    CELL_COLUMNS,
    ROOT,
    gene_id,
    one_thread,
    project_paths,
    run_stage_process,
    tiny_geneformer_config,
    write_gene_files,
    write_params,
)
from rosmap_geneformer.analysis import embeddings, perturbation, truth

VOCAB = 80


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models run fastest, and steadiest on a busy machine, on one thread."""
    with one_thread():
        yield


def run_stage(params: Path) -> subprocess.CompletedProcess[str]:
    return run_stage_process(ROOT / "src" / "stages" / "perturb.py", params)


# ------------------------------------------------------------------------------------------
# Encodings


def test_delete_tokens_v1_and_v2():
    assert perturbation.delete_tokens([7, 5, 9, 4], [9]).tolist() == [7, 5, 4]
    assert perturbation.delete_tokens([7, 5, 9, 4], [9, 7]).tolist() == [5, 4]
    assert perturbation.delete_tokens([2, 7, 5, 9, 3], [5]).tolist() == [2, 7, 9, 3]
    assert perturbation.delete_tokens([7, 5], [11]).tolist() == [7, 5]  # absent: unchanged


def test_overexpress_present_genes_move_to_the_front():
    # V1: position 0; several genes keep their original relative order.
    assert perturbation.overexpress_tokens([7, 5, 9, 4], [4], special_tokens=False).tolist() == [
        4,
        7,
        5,
        9,
    ]
    assert perturbation.overexpress_tokens([7, 5, 9, 4], [4, 5], special_tokens=False).tolist() == [
        5,
        4,
        7,
        9,
    ]
    # V2: right after <cls>; <eos> stays last.
    assert perturbation.overexpress_tokens([2, 7, 5, 9, 3], [9], special_tokens=True).tolist() == [
        2,
        9,
        7,
        5,
        3,
    ]


def test_overexpress_absent_genes_are_inserted_and_truncated():
    assert perturbation.overexpress_tokens(
        [7, 5, 9, 4], [11], special_tokens=False, max_length=4
    ).tolist() == [11, 7, 5, 9]
    # V2 keeps <eos> as the last token after truncation.
    assert perturbation.overexpress_tokens(
        [2, 7, 5, 9, 3], [11], special_tokens=True, max_length=5
    ).tolist() == [2, 11, 7, 5, 3]
    assert perturbation.overexpress_tokens(
        [2, 7, 5, 3], [5, 11], special_tokens=True, max_length=8
    ).tolist() == [2, 5, 11, 7, 3]


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("perturb_type", ["delete", "overexpress"])
def test_perturbation_batch_equals_one_encoding_per_gene(special, perturb_type):
    rng = np.random.default_rng(0)
    genes = rng.choice(np.arange(4, VOCAB), size=17, replace=False).astype(np.int16)
    ids = np.concatenate([[2], genes, [3]]).astype(np.int16) if special else genes
    window = perturbation.gene_slice(len(ids), special_tokens=special)
    positions = np.arange(window.start, window.stop)
    batch, index = perturbation.perturbation_batch(
        ids, positions, perturb_type=perturb_type, special_tokens=special
    )
    assert batch.dtype == ids.dtype
    for row, p in enumerate(positions):
        token = [ids[p]]
        if perturb_type == "delete":
            expected = perturbation.delete_tokens(ids, token)
        else:
            expected = perturbation.overexpress_tokens(ids, token, special_tokens=special)
        np.testing.assert_array_equal(batch[row], expected)
        np.testing.assert_array_equal(ids[index[row]], expected)


def test_perturbation_batch_refuses_special_positions():
    with pytest.raises(ValueError, match="non-gene position"):
        perturbation.perturbation_batch(
            [2, 7, 5, 3], [0], perturb_type="delete", special_tokens=True
        )


def test_overexpression_positions_skip_the_front_gene():
    cells = [np.array([7, 5, 9]), np.array([2, 5, 7, 3])]
    v1 = perturbation.perturbation_positions(
        cells[:1], np.array([5, 7]), perturb_type="overexpress", special_tokens=False
    )
    assert v1[0].tolist() == [1]  # 7 is already first
    v2 = perturbation.perturbation_positions(
        cells[1:], np.array([5, 7]), perturb_type="overexpress", special_tokens=True
    )
    assert v2[0].tolist() == [2]
    deletion = perturbation.perturbation_positions(
        cells[:1], np.array([5, 7]), perturb_type="delete", special_tokens=False
    )
    assert deletion[0].tolist() == [0, 1]


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
        window = perturbation.gene_slice(len(ids), special_tokens=special)
        candidates = np.arange(window.start + 1, window.stop)
        positions.append(np.sort(rng.choice(candidates, size=5, replace=False)))
    positions[2] = positions[2][:0]  # a cell with nothing to perturb is skipped
    stats_ = perturbation.EngineStats()
    results = list(
        perturbation.perturb_cells(
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
        original, perturbed = perturbation.naive_cell_shifts(
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
        naive_cos = perturbation.cosine(perturbed, original[None])
        np.testing.assert_allclose(result.cell_cosines, naive_cos, atol=1e-6)


@pytest.mark.parametrize("special", [False, True])
def test_gene_mode_aligns_remaining_genes(random_encoder, special):
    cells = cells_for(3, special=special, seed=5)
    window = [perturbation.gene_slice(len(c), special_tokens=special) for c in cells]
    positions = [np.array([w.start, w.start + 3]) for w in window]
    results = perturbation.perturb_cells(
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
                result.gene_cosines[k], perturbation.cosine(perturbed, aligned), atol=1e-5
            )


# ------------------------------------------------------------------------------------------
# Statistics


def test_benjamini_hochberg_matches_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.5, 0.0001, 0.04, 0.9])
    np.testing.assert_allclose(
        perturbation.benjamini_hochberg(p), stats.false_discovery_control(p, method="bh")
    )
    # By hand for three tests: sorted 0.01, 0.02, 0.04 -> 0.03, 0.03, 0.04.
    np.testing.assert_allclose(
        perturbation.benjamini_hochberg([0.04, 0.01, 0.02]), [0.04, 0.03, 0.03]
    )
    with_nan = perturbation.benjamini_hochberg([0.01, np.nan, 0.02])
    assert np.isnan(with_nan[1])
    np.testing.assert_allclose(with_nan[[0, 2]], [0.02, 0.02])


def test_shift_statistics_rank_sum_against_the_pooled_null():
    rng = np.random.default_rng(0)
    shifts = {
        5: rng.normal(0.5, 0.1, 20),
        6: rng.normal(0.0, 0.1, 30),
        7: rng.normal(0.0, 0.1, 25),
    }
    table = perturbation.shift_statistics(shifts, null_size=100_000, seed=0)
    null = np.concatenate([shifts[5], shifts[6], shifts[7]])
    for gene, values in shifts.items():
        assert table.loc[gene, "mean_shift"] == pytest.approx(values.mean())
        assert table.loc[gene, "p"] == pytest.approx(stats.ranksums(values, null).pvalue)
        assert table.loc[gene, "n_cells"] == values.size
    np.testing.assert_allclose(
        table["fdr"], stats.false_discovery_control(table["p"].to_numpy(), method="bh")
    )
    assert table.loc[5, "fdr"] < 1e-4
    # A downsampled null is seeded: same seed, same numbers.
    small = perturbation.shift_statistics(shifts, null_size=30, seed=3)
    again = perturbation.shift_statistics(shifts, null_size=30, seed=3)
    pd.testing.assert_frame_equal(small, again)
    assert perturbation.pooled_null(shifts, size=30, seed=3).size == 30


def test_state_shifts_are_cosine_differences():
    original = np.array([1.0, 0.0])
    perturbed = np.array([[1.0, 1.0], [0.0, 1.0]])
    shifts = perturbation.state_shifts(perturbed, original, {"goal": np.array([0.0, 2.0])})
    np.testing.assert_allclose(shifts["goal"], [np.sqrt(0.5), 1.0])


# ------------------------------------------------------------------------------------------
# A tiny planted data set: a classifier trained on it, then perturbed


AD_TOKENS = [4, 5, 6]
CELL_TYPE_TOKENS = {"Mic": [10, 11, 12], "Ast": [13, 14, 15]}


def planted_cells(n: int, *, seed: int) -> dict[str, list]:
    """Cells of two types; AD cells carry the AD tokens at random ranks in their top half."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in CELL_COLUMNS}
    background = np.arange(20, VOCAB)
    for i in range(n):
        cell_type = ["Mic", "Ast"][i % 2]
        status = ["AD", "control"][(i // 2) % 2]
        ids = list(CELL_TYPE_TOKENS[cell_type])
        ids += rng.choice(background, size=int(rng.integers(14, 22)), replace=False).tolist()
        if status == "AD":
            for token in AD_TOKENS:
                ids.insert(int(rng.integers(0, len(ids) // 2 + 1)), token)
        rows["input_ids"].append(ids)
        rows["length"].append(len(ids))
        rows["cell_id"].append(f"c{i:04d}")
        rows["patient_id"].append(f"P{i % 6}")
        rows["cell_type"].append(cell_type)
        rows["ad_status"].append(status)
    return rows


def train_classifier(dataset: datasets.Dataset, *, seed: int = 0) -> BertForSequenceClassification:
    with one_thread():
        return _train_classifier(dataset, seed=seed)


def _train_classifier(dataset: datasets.Dataset, *, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = tiny_geneformer_config(VOCAB)
    config.num_labels = 2
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ids, mask = embeddings.pad_batch(dataset["input_ids"])
    labels = torch.tensor([s == "AD" for s in dataset["ad_status"]], dtype=torch.long)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(8):
        for batch in torch.randperm(len(labels), generator=generator).split(16):
            loss = model(
                input_ids=ids_t[batch], attention_mask=mask_t[batch], labels=labels[batch]
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def planted_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files the perturb stage reads: tokenized train split, token dictionary, sampled h5ad
    (var only matters) and a fine-tuned disease model, in a temp dir."""
    root = tmp_path_factory.mktemp("planted")
    rows = planted_cells(160, seed=0)
    dataset = datasets.Dataset.from_dict(rows)
    dataset.save_to_disk(root / "tok" / "train.dataset")
    tokens = list(range(2, VOCAB))
    write_gene_files(
        root,
        tokens=tokens,
        symbols=[f"AD{t}" if t in AD_TOKENS else f"G{t}" for t in tokens],
        counts=sparse.csr_matrix((len(dataset), len(tokens)), dtype=np.float32),
        obs=pd.DataFrame(index=rows["cell_id"]),
    )
    model = train_classifier(dataset)
    model.save_pretrained(root / "finetuned" / "disease")
    params = {
        "seed": 0,
        "paths": project_paths(
            root, "tokenized", "dictionaries", "sampled", "ensembl", "finetuned", "reports"
        ),
        "perturb": {
            "task": "disease",
            "emb_layer": 0,
            "split": "train",
            "state_key": "ad_status",
            "start_state": "AD",
            "goal_state": "control",
            "alt_states": [],
            "cell_type": "Mic",
            "types": ["delete", "overexpress"],
            "max_cells": 30,
            "min_cells": 5,
            "max_state_cells": 100,
            "null_size": 100000,
            "fdr": 0.05,
            "max_tokens": 2048,
            "batch_size": 16,
            "top_n": 10,
        },
    }
    write_params(root, params)
    return root


def test_planted_ad_genes_rank_first_in_the_perturb_stage(planted_project):
    root = planted_project
    proc = run_stage(root / "params.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "reports" / "perturb"
    table = pd.read_csv(out / "delete.tsv", sep="\t")
    assert list(table.columns[:7]) == ["token", "rank", "gene", "symbol", "mean_shift", "p", "fdr"]
    assert "n_cells" in table.columns
    ranks = table.set_index("symbol")["rank"]
    ad_ranks = sorted(ranks[[f"AD{t}" for t in AD_TOKENS]])
    # The three planted AD genes are the three genes whose deletion moves AD cells most towards
    # control, and they are significant; the random background is not, by and large.
    assert ad_ranks == [1, 2, 3], table.head(8)
    assert table.set_index("symbol").loc[[f"AD{t}" for t in AD_TOKENS], "significant"].all()
    assert (table["mean_shift"].iloc[:3] > 0).all()
    background = table[table["symbol"].str.startswith("G")]
    assert background["significant"].mean() < 0.5
    # Overexpression of genes already in AD cells pushes them further from control.
    over = pd.read_csv(out / "overexpress.tsv", sep="\t").set_index("symbol")
    assert len(over) > 0
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["cells"]["perturbed"] == 30
    assert summary["genes"]["perturbed"] == len(table)
    assert (out / "delete_top_genes.png").stat().st_size > 0
    # Same inputs, same numbers (in process, to keep the test short).
    encoder, _ = embeddings.load_encoder(root / "finetuned" / "disease", device="cpu")
    with (root / "dict" / "token_dictionary.pkl").open("rb") as fh:
        token_dictionary = pickle.load(fh)
    annotation = perturbation.token_annotation(
        token_dictionary,
        {gene_id(t): f"AD{t}" if t in AD_TOKENS else f"G{t}" for t in range(2, VOCAB)},
    )
    settings = perturbation.PerturbSettings.from_params(
        {**yaml.safe_load((root / "params.yaml").read_text())["perturb"], "types": ["delete"]}
    )
    tables, _ = perturbation.perturb_dataset(
        encoder,
        datasets.load_from_disk(str(root / "tok" / "train.dataset")),
        settings=settings,
        annotation=annotation,
        special_tokens=False,
        progress=False,
    )
    again = tables["delete"].copy()
    pd.testing.assert_frame_equal(again.reset_index(drop=True), table, check_dtype=False)


def test_perturb_settings_reject_unknown_keys_and_test_split():
    with pytest.raises(ValueError, match="unknown keys"):
        perturbation.PerturbSettings.from_params({"bogus": 1})
    with pytest.raises(ValueError, match="test is reserved"):
        perturbation.PerturbSettings.from_params({"split": "test"})
    with pytest.raises(ValueError, match="perturb.types"):
        perturbation.PerturbSettings.from_params({"types": ["inhibit"]})


def test_perturbation_table_ranks_by_goal_or_net_shift():
    goal = {5: np.array([0.3, 0.3]), 6: np.array([0.2, 0.2]), 7: np.array([0.1, 0.1])}
    start = {5: np.array([0.3, 0.3]), 6: np.array([-0.1, -0.1]), 7: np.array([0.0, 0.0])}
    net = {t: goal[t] - start[t] for t in goal}
    shifts = {"control": goal, "AD": start, "net": net}
    cosines = {t: np.array([0.9, 0.9]) for t in goal}
    by_goal = perturbation.perturbation_table(shifts, cosines, goal_state="control")
    by_net = perturbation.perturbation_table(shifts, cosines, goal_state="control", rank_by="net")
    assert by_goal.index.tolist() == [5, 6, 7]
    assert by_net.index.tolist() == [6, 7, 5]
    assert list(by_net.columns) == [
        "mean_shift",
        "p",
        "fdr",
        "n_cells",
        "AD_mean_shift",
        "AD_p",
        "AD_fdr",
        "net_mean_shift",
        "net_p",
        "net_fdr",
        "mean_cosine_to_original",
    ]
    assert by_net.loc[6, "net_mean_shift"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="rank_by"):
        perturbation.perturbation_table(
            {"control": goal}, cosines, goal_state="control", rank_by="net"
        )


def test_bfloat16_precision_keeps_the_ranking_of_shifts(random_encoder):
    cells = cells_for(4, special=False, seed=9)
    positions = [np.arange(len(c)) for c in cells]

    def shifts(precision: str) -> np.ndarray:
        results = perturbation.perturb_cells(
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


def test_planted_ad_genes_are_scored_from_their_expected_end():
    table = pd.DataFrame({"gene": [f"G{i}" for i in range(10)]})
    planted = pd.DataFrame(
        {
            "ensembl_id": ["G0", "G9", "G5", "GX"],
            "gene": ["UP1", "DOWN1", "MIC", "ABSENT"],
            "cell_types": ["Exc", "Exc,Ast", "Mic", "Exc"],
            "direction": ["up", "down", "up", "up"],
        }
    )
    deleted = truth.perturbation_against_truth(
        table, planted, perturb_type="delete", cell_types=["Exc"]
    )
    # UP1 first and DOWN1 last are both at their expected end; MIC acts elsewhere, ABSENT untested.
    assert [(g["symbol"], g["rank"]) for g in deleted["genes"]] == [("UP1", 1), ("DOWN1", 10)]
    assert [g["percentile"] for g in deleted["genes"]] == pytest.approx([0.05, 0.05])
    assert deleted["auroc"] == 1.0
    others = (np.arange(1, 9) + 0.5) / 10
    expected = stats.mannwhitneyu([0.05, 0.05], others, alternative="less").pvalue
    assert deleted["p"] == pytest.approx(expected)
    # Overexpression expects the opposite ends: both planted genes are at the worst place.
    overexpressed = truth.perturbation_against_truth(
        table, planted, perturb_type="overexpress", cell_types=["Exc"]
    )
    assert overexpressed["auroc"] == 0.0 and overexpressed["mean_percentile"] == pytest.approx(0.95)
    assert (
        truth.perturbation_against_truth(table, planted, perturb_type="delete")["planted_tested"]
        == 3
    )
    with pytest.raises(ValueError, match="perturb_type"):
        truth.perturbation_against_truth(table, planted, perturb_type="knockdown")
