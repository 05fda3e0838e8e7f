"""The tokenizer's order of exactly tied genes: ascending token id, on every CPU.

numpy's default argsort is not stable, and which kernel it runs depends on the CPU (scalar
introsort, AVX2 or AVX-512 sorting networks), so the order it gives exactly equal values differs
from one machine to the next. The tokenizer ranks with that fast sort and then puts every group of
exactly equal values in ascending token id (the token dictionary's order), so its bytes depend on
neither the CPU nor the column order of the input.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from builders import LENIENT_LOSSES
from rosmap_geneformer.geneformer.dictionaries import build_dictionaries, save_dictionaries
from rosmap_geneformer.geneformer.tokenizer import tokenize_anndata

MEDIANS = (0.5, 1.0, 2.0)  # few distinct medians: equal counts give exact ties
COUNTS = (1, 1, 1, 1, 2, 2, 3, 4)  # integer counts, mostly 1


def _gene_ids(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


def _tie_heavy(*, n_cells: int, n_genes: int, seed: int) -> tuple[ad.AnnData, dict[str, float]]:
    """Raw counts where most genes of a cell share their value with many others.

    Cells hold from a few genes (sorted by insertion sort inside numpy) to over a thousand (sorted
    by the SIMD kernels where the CPU has them); var is in an order unrelated to token ids.
    """
    rng = np.random.default_rng(seed)
    genes = _gene_ids(n_genes)
    medians = {g: float(rng.choice(MEDIANS)) for g in genes}
    var_order = rng.permutation(n_genes)
    x = np.zeros((n_cells, n_genes), dtype=np.float32)
    for i in range(n_cells):
        k = [5, 14, 40, 300, 1100, n_genes][i % 6]
        cols = rng.choice(n_genes, size=k, replace=False)
        x[i, cols] = rng.choice(COUNTS, size=k)
    obs = pd.DataFrame(
        {"n_counts": (x.sum(axis=1) + 100).astype(np.float32)},
        index=[f"L1_{i:05d}-1" for i in range(n_cells)],
    )
    ids = [genes[j] for j in var_order]
    var = pd.DataFrame({"ensembl_id": ids}, index=[f"g{j}" for j in var_order])
    return ad.AnnData(X=sparse.csr_matrix(x), obs=obs, var=var), medians


# --------------------------------------------------------------------------------------------
# The same bytes with numpy's SIMD sort dispatch on and off
# --------------------------------------------------------------------------------------------
_CHILD = """
import hashlib, json, sys
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__
from rosmap_geneformer.geneformer.dictionaries import load_dictionaries
from rosmap_geneformer.geneformer.tokenizer import tokenize_h5ad
from rosmap_geneformer.params_schema import Losses

LENIENT_LOSSES = Losses(**{key: {"warn": 1, "stop": 1} for key in Losses.model_fields})
h5ad, pairs, out, disabled = sys.argv[1:5]
for name, paths in json.loads(pairs).items():
    tokenize_h5ad(h5ad, f"{out}/{name}.dataset", dictionaries=load_dictionaries(*paths),
                  model_input_size=700 if name == "V1" else 4096, special_tokens=name == "V2",
                  columns=["cell_id"], chunk_size=64, losses=LENIENT_LOSSES)
# What numpy's default argsort does with the same kind of ties, for the record.
rng = np.random.default_rng(0)
hazard = hashlib.sha256()
for n in (20, 300, 1100, 2000):
    hazard.update(np.argsort(-rng.choice([0.5, 1.0, 2.0], n)).tobytes())
print(json.dumps({
    "still_enabled": [f for f in disabled.split() if __cpu_features__.get(f)],
    "numpy_default_argsort": hazard.hexdigest(),
}))
"""


def _dispatched() -> list[str]:
    """The CPU feature groups this numpy dispatches to at run time (and so can disable)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__

    return list(__cpu_dispatch__)


def _variants() -> dict[str, list[str]]:
    dispatched = _dispatched()
    avx512 = [f for f in dispatched if f.startswith("AVX512") or f == "X86_V4"]
    return {"default": [], "no_avx512": avx512, "no_simd_dispatch": dispatched}


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_same_bytes_with_simd_sort_dispatch_on_and_off(tmp_path: Path) -> None:
    adata, medians = _tie_heavy(n_cells=60, n_genes=2000, seed=0)
    adata.write_h5ad(tmp_path / "in.h5ad")
    pairs = {}
    for name in ("V1", "V2"):
        built = build_dictionaries(medians, special_tokens=name == "V2")
        paths = save_dictionaries(built, tmp_path / name)
        pairs[name] = [str(paths["token_dictionary"]), str(paths["gene_median_dictionary"])]
    digests, hazards = {}, {}
    for name, disabled in _variants().items():
        env = {k: v for k, v in os.environ.items() if k != "NPY_DISABLE_CPU_FEATURES"}
        if disabled:
            env["NPY_DISABLE_CPU_FEATURES"] = " ".join(disabled)
        out = tmp_path / "out" / name
        out.mkdir(parents=True)
        args = [str(tmp_path / "in.h5ad"), json.dumps(pairs), str(out), " ".join(disabled)]
        run = subprocess.run(
            [sys.executable, "-c", _CHILD, *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        # numpy accepted the names (it warns about names it cannot disable) and applied them.
        assert "cannot disable" not in run.stderr, run.stderr
        child = json.loads(run.stdout.strip().splitlines()[-1])
        assert child["still_enabled"] == []
        digests[name] = _digest(out)
        hazards[name] = child["numpy_default_argsort"]
    assert len(digests["default"]) >= 6  # arrow shard, state and info of both datasets
    # On CPUs with AVX2 or AVX-512, numpy's own tie order usually differs between variants
    # (``hazards``); the tokenizer's output must not.
    assert digests["no_avx512"] == digests["default"], hazards
    assert digests["no_simd_dispatch"] == digests["default"], hazards


# --------------------------------------------------------------------------------------------
# The rule itself: ascending token id within a tie, whatever the column order
# --------------------------------------------------------------------------------------------
def _expected(adata: ad.AnnData, medians: dict[str, float], token_dict: dict) -> list[list[int]]:
    """Tokens by (value descending, token id ascending); value = count / median per cell.

    Within a cell n_counts is common to all genes, so equal count / median means equal value.
    """
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    ids = list(adata.var["ensembl_id"])
    out = []
    for row in x:
        keyed = [
            (-(float(row[j]) / medians[g]), token_dict[g]) for j, g in enumerate(ids) if row[j]
        ]
        if keyed:
            out.append([token for _, token in sorted(keyed)])
    return out


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("special", [False, True], ids=["V1", "V2"])
def test_ties_follow_token_ids_whatever_the_column_order(
    tmp_path: Path, dense: bool, special: bool
) -> None:
    # One median for every gene and counts 1 or 2: two large tie groups per cell.
    n_genes, n_cells = 120, 24
    rng = np.random.default_rng(5)
    genes = _gene_ids(n_genes)
    medians = dict.fromkeys(genes, 1.0)
    dictionaries = build_dictionaries(medians, special_tokens=special)
    token_dict = dictionaries.token_dictionary
    x = np.zeros((n_cells, n_genes), dtype=np.float32)
    for i in range(n_cells):
        k = [3, 17, 60, n_genes][i % 4]
        x[i, rng.choice(n_genes, size=k, replace=False)] = rng.choice([1, 2], size=k)
    obs = pd.DataFrame(
        {"n_counts": (x.sum(axis=1) + 10).astype(np.float32)},
        index=[f"c{i}" for i in range(n_cells)],
    )
    expected = _expected(
        ad.AnnData(X=x, var=pd.DataFrame({"ensembl_id": genes}, index=genes)),
        medians,
        token_dict,
    )
    limit = 50  # cuts through a tie group in the larger cells: the lowest token ids are kept
    outputs = []
    for permutation in (np.arange(n_genes), np.arange(n_genes)[::-1], rng.permutation(n_genes)):
        columns = x[:, permutation]
        var = pd.DataFrame(
            {"ensembl_id": [genes[j] for j in permutation]}, index=[f"g{j}" for j in permutation]
        )
        adata = ad.AnnData(
            X=columns if dense else sparse.csr_matrix(columns), obs=obs.copy(), var=var
        )
        path = tmp_path / f"{len(outputs)}.dataset"
        tokenize_anndata(
            adata,
            path,
            dictionaries=dictionaries,
            model_input_size=limit + 2 if special else limit,
            special_tokens=special,
            columns=[],
            chunk_size=7,
            losses=LENIENT_LOSSES,
        )
        ids = datasets.load_from_disk(str(path))["input_ids"]
        if special:
            assert all(cell[0] == 2 and cell[-1] == 3 for cell in ids)
            ids = [cell[1:-1] for cell in ids]
        outputs.append(ids)
    assert outputs[0] == [cell[:limit] for cell in expected]
    assert outputs[1] == outputs[0]
    assert outputs[2] == outputs[0]
    assert any(len(cell) == limit for cell in outputs[0])  # the limit was reached


def test_ties_between_duplicate_and_distinct_columns(tmp_path: Path) -> None:
    """A duplicated id gets the same token twice; the other tied genes sort around it."""
    genes = _gene_ids(6)
    medians = dict.fromkeys(genes, 2.0)
    dictionaries = build_dictionaries(medians)
    ids = [genes[4], genes[1], genes[4], genes[0], genes[5], genes[2]]
    x = np.array([[1, 1, 1, 1, 3, 1], [2, 1, 2, 2, 0, 1]], dtype=np.float32)
    adata = ad.AnnData(
        X=sparse.csr_matrix(x),
        obs=pd.DataFrame({"n_counts": np.array([50, 50], dtype=np.float32)}, index=["a", "b"]),
        var=pd.DataFrame({"ensembl_id": ids}, index=[f"g{j}" for j in range(6)]),
    )
    tokenize_anndata(
        adata, tmp_path / "o.dataset", dictionaries=dictionaries, columns=[], losses=LENIENT_LOSSES
    )
    token = dictionaries.token_dictionary
    t = [token[g] for g in genes]
    assert datasets.load_from_disk(str(tmp_path / "o.dataset"))["input_ids"] == [
        [t[5], t[0], t[1], t[2], t[4], t[4]],
        [t[0], t[4], t[4], t[1], t[2]],
    ]
