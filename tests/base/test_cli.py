"""Tests of the ``rosmap-geneformer`` command line and the dictionaries/tokenize stage scripts."""

from __future__ import annotations

import json
import pickle
import runpy
import subprocess
import sys
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import sparse

from builders import write_sampled_splits
from rosmap_geneformer.cli import main
from rosmap_geneformer.geneformer.dictionaries import load_dictionaries
from rosmap_geneformer.geneformer.tokenizer import tokenize_h5ad

ROOT = Path(__file__).resolve().parents[2]
GENES = [f"ENSG{i:011d}" for i in range(1, 61)]


def _write_h5ad(path: Path, *, n_cells: int = 40, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.6, (n_cells, len(GENES))).astype(np.float32)
    obs = pd.DataFrame(
        {
            "n_counts": (x.sum(axis=1) + 20).astype(np.float32),
            "patient_id": [f"D{i % 4}" for i in range(n_cells)],
            "cell_type": rng.choice(["Exc", "Inh"], n_cells),
            "ad_status": rng.choice(["AD", "control"], n_cells),
        },
        index=[f"L1_{i:04d}-1" for i in range(n_cells)],
    )
    adata = ad.AnnData(
        X=sparse.csr_matrix(x), obs=obs, var=pd.DataFrame({"ensembl_id": GENES}, index=GENES)
    )
    adata.write_h5ad(path)
    return adata


def _write_dictionaries(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    tokens = {"<pad>": 0, "<mask>": 1, **{g: np.int16(i + 2) for i, g in enumerate(GENES)}}
    medians = {g: np.float64(1 + (i % 3)) for i, g in enumerate(GENES)}
    paths = folder / "tokens.pkl", folder / "medians.pkl"
    for path, obj in zip(paths, (tokens, medians), strict=True):
        with path.open("wb") as fh:
            pickle.dump(obj, fh)
    return paths


def test_tokenize_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_h5ad(tmp_path / "in.h5ad")
    tokens, medians = _write_dictionaries(tmp_path / "dicts")
    status = main(
        [
            "tokenize",
            "--input",
            str(tmp_path / "in.h5ad"),
            "--output",
            str(tmp_path / "out.dataset"),
            "--token-dictionary",
            str(tokens),
            "--gene-median-dictionary",
            str(medians),
            "--model-input-size",
            "16",
            "--columns",
            "cell_id,cell_type",
            "--report",
            str(tmp_path / "report.json"),
        ]
    )
    assert status == 0
    assert "40 cells tokenized" in capsys.readouterr().out
    ds = datasets.load_from_disk(str(tmp_path / "out.dataset"))
    assert list(ds.features) == ["input_ids", "cell_id", "cell_type", "length"]
    assert ds.features["input_ids"] == datasets.List(datasets.Value("int16"))
    assert max(ds["length"]) == 16
    assert json.loads((tmp_path / "report.json").read_text())["cells"]["tokenized"] == 40


def test_tokenize_command_reports_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_h5ad(tmp_path / "in.h5ad")
    tokens, medians = _write_dictionaries(tmp_path / "dicts")
    args = ["tokenize", "--input", str(tmp_path / "in.h5ad"), "--output", str(tmp_path / "o")]
    args += ["--token-dictionary", str(tokens), "--gene-median-dictionary", str(medians)]
    assert main([*args, "--special-tokens"]) == 2
    assert "no <cls>/<eos>" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dictionaries_command(tmp_path: Path) -> None:
    _write_h5ad(tmp_path / "train.h5ad")
    out = tmp_path / "dicts"
    args = ["dictionaries", "--input", str(tmp_path / "train.h5ad"), "--output", str(out)]
    status = main([*args, "--special-tokens"])
    assert status == 0
    with (out / "token_dictionary.pkl").open("rb") as fh:
        tokens = pickle.load(fh)
    assert list(tokens)[:4] == ["<pad>", "<mask>", "<cls>", "<eos>"]
    assert len(tokens) == 4 + len(GENES)


def test_installed_entry_point() -> None:
    script = Path(sys.executable).parent / "rosmap-geneformer"
    if not script.exists():
        pytest.skip("the package is not installed in this environment (run `make setup`)")
    done = subprocess.run(
        [str(script), "tokenize", "--help"], capture_output=True, text=True, check=True
    )
    assert "--gene-median-dictionary" in done.stdout


def test_stages_build_dictionaries_and_tokenize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("whole").mkdir()
    splits = {
        split: _write_h5ad(Path("whole") / f"{split}.h5ad", seed=seed)
        for seed, split in enumerate(("train", "val", "test"))
    }
    # As the pipeline keeps them: one matrix, the splits' rows interleaved, and cell tables.
    matrix = write_sampled_splits(Path("data"), splits, tables="processed/sampled")
    params = {
        "paths": {
            "ensembl": str(matrix),
            "sampled": "data/processed/sampled",
            "dictionaries": "models/dictionaries",
            "tokenized": "data/processed/tokenized",
            "reports": "reports",
        },
        "dictionaries": {"source": "from_data", "chunk_size": 16},
        "tokenize": {
            "model_input_size": 2048,
            "special_tokens": False,
            "columns": ["cell_id", "patient_id", "cell_type", "ad_status"],
            "chunk_size": 16,
            "nproc": 1,
        },
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    runpy.run_path(str(ROOT / "src/stages/dictionaries.py"), run_name="stage")["main"]([])
    report = json.loads(Path("reports/dictionaries.json").read_text())
    assert report["layout"] == "V1"
    assert report["genes"] == len(GENES)
    tokenize = runpy.run_path(str(ROOT / "src/stages/tokenize_split.py"), run_name="stage")["main"]
    for split in ("train", "val", "test"):
        tokenize(["--split", split])
        metrics = json.loads(Path(f"reports/tokenize/{split}.json").read_text())
        assert metrics["cells"]["tokenized"] == 40
        assert metrics["genes"]["fraction_genes_in_vocabulary"] == 1.0
        ds = datasets.load_from_disk(f"data/processed/tokenized/{split}.dataset")
        assert ds.features["input_ids"] == datasets.List(datasets.Value("int32"))
        assert ds["cell_id"][0] == "L1_0000-1"
        # Rows read from the one matrix by cell table = the split written out whole.
        tokenize_h5ad(
            Path("whole") / f"{split}.h5ad",
            Path("whole") / f"{split}.dataset",
            dictionaries=load_dictionaries(
                Path("models/dictionaries/token_dictionary.pkl"),
                Path("models/dictionaries/gene_median_dictionary.pkl"),
            ),
            columns=params["tokenize"]["columns"],
            chunk_size=params["tokenize"]["chunk_size"],
        )
        for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json"):
            assert (Path("whole") / f"{split}.dataset" / name).read_bytes() == (
                Path(f"data/processed/tokenized/{split}.dataset") / name
            ).read_bytes(), name

    # source=geneformer copies the two pickles byte for byte.
    tokens, medians = _write_dictionaries(tmp_path / "gf")
    params["dictionaries"].update(
        {
            "source": "geneformer",
            "token_dictionary": str(tokens),
            "gene_median_dictionary": str(medians),
        }
    )
    Path("params.yaml").write_text(yaml.safe_dump(params))
    runpy.run_path(str(ROOT / "src/stages/dictionaries.py"), run_name="stage")["main"]([])
    assert Path("models/dictionaries/token_dictionary.pkl").read_bytes() == tokens.read_bytes()
