"""Shared scaffolding of the unit tests: tiny tokenized cells, tiny BERT models, the files and
params of a tiny project, and stage runners.

Imported by the test modules as ``from builders import ...`` (pytest puts ``tests/`` on
``sys.path``). Every builder takes the sizes, seeds and values its tests depend on as
parameters, so that each test keeps its own data.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import torch
import yaml
from scipy import sparse
from transformers import BertConfig, BertForMaskedLM

from rosmap_geneformer.geneformer.model import geneformer_bert_config
from rosmap_geneformer.params_schema import Losses

ROOT = Path(__file__).resolve().parents[1]

#: Where a tiny test project keeps each ``paths.<key>`` of params.yaml, below its root.
PROJECT_LAYOUT = {
    "tokenized": "tok",
    "dictionaries": "dict",
    "sampled": "sampled",
    "ensembl": "ensembl.h5ad",
    "base_model": "base",
    "finetuned": "finetuned",
    "checkpoints": "checkpoints",
    "dvclive": "dvclive",
    "embeddings": "embeddings",
    "reports": "reports",
    "grn": "network",
}

#: Loss limits that never warn or stop: toy inputs lose more genes and cells than the shipped
#: limits allow, on purpose.
LENIENT_LOSSES = Losses(**{key: {"warn": 1, "stop": 1} for key in Losses.model_fields})

#: The ``paths`` keys the train stage reads.
TRAIN_PATHS = ("tokenized", "base_model", "finetuned", "checkpoints", "dvclive")

CELL_COLUMNS = ("input_ids", "length", "cell_id", "patient_id", "cell_type", "ad_status")


# ------------------------------------------------------------------------------------------
# Data


def tokenized_cells(
    n: int,
    patients: Sequence[str],
    *,
    seed: int,
    vocab_size: int,
    lengths: tuple[int, int],
    ad_token: int | None = None,
    cell_id: str = "cell{i:04d}",
) -> datasets.Dataset:
    """Tokenized-looking cells whose first ten tokens carry the cell type.

    Cell ``i`` is of type Exc, Mic, Ast in turn (tokens from 2, 20, 40), from donor
    ``patients[i % len(patients)]``; donors with an odd number (``"P3"``) are AD.

    Parameters
    ----------
    n
        Number of cells.
    patients
        Donor ids, ``"P<number>"``.
    seed
        Seed of the random background tokens.
    vocab_size
        Background tokens are drawn from ``2..vocab_size - 1``.
    lengths
        Low (inclusive) and high (exclusive) number of tokens before any ``ad_token``.
    ad_token
        Put first in the cells of AD donors; ``None``: no AD token.
    cell_id
        Format of the cell ids, with fields ``i`` and ``patient``.

    Returns
    -------
    datasets.Dataset
        Columns ``CELL_COLUMNS``.
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in CELL_COLUMNS}
    for i in range(n):
        cell_type = ["Exc", "Mic", "Ast"][i % 3]
        patient = patients[i % len(patients)]
        status = "AD" if int(patient[1:]) % 2 else "control"
        start = {"Exc": 2, "Mic": 20, "Ast": 40}[cell_type]
        length = int(rng.integers(*lengths))
        ids = list(range(start, start + 10)) + rng.integers(2, vocab_size, length - 10).tolist()
        if ad_token is not None and status == "AD":
            ids = [ad_token, *ids]
        rows["input_ids"].append(ids)
        rows["length"].append(len(ids))
        rows["cell_id"].append(cell_id.format(i=i, patient=patient))
        rows["patient_id"].append(patient)
        rows["cell_type"].append(cell_type)
        rows["ad_status"].append(status)
    return datasets.Dataset.from_dict(rows)


def write_train_inputs(
    root: Path, *, train: datasets.Dataset, val: datasets.Dataset, vocab_size: int
) -> None:
    """Save what the train stage reads: ``root/tok/{train,val}.dataset`` and a random base model
    in ``root/base`` (``save_random_base_model``, seed 0)."""
    train.save_to_disk(root / "tok/train.dataset")
    val.save_to_disk(root / "tok/val.dataset")
    save_random_base_model(root / "base", vocab_size)


def write_sampled_splits(
    root: Path, splits: Mapping[str, ad.AnnData], *, tables: str = "sampled"
) -> Path:
    """Write splits as the pipeline keeps them: one count matrix and a cell table per split.

    The splits' rows are stacked, in the order given, into ``root/ensembl.h5ad``; each split gets
    ``root/<tables>/<split>.parquet`` (its ``obs`` and ``matrix_row``). Returns the matrix path.
    """
    from rosmap_geneformer.counts import MATRIX_ROW, write_cells

    pieces = list(splits.values())
    var = pieces[0].var
    for piece in pieces[1:]:
        pd.testing.assert_frame_equal(piece.var, var)
    matrix = root / "ensembl.h5ad"
    root.mkdir(parents=True, exist_ok=True)
    x = sparse.vstack([sparse.csr_matrix(p.X) for p in pieces], format="csr")
    obs_index = [name for p in pieces for name in p.obs_names]
    ad.AnnData(X=x, obs=pd.DataFrame(index=obs_index), var=var).write_h5ad(matrix)
    start = 0
    for split, piece in splits.items():
        table = piece.obs.copy()
        table[MATRIX_ROW] = np.arange(start, start + piece.n_obs, dtype=np.int64)
        write_cells(table, root / tables / f"{split}.parquet")
        start += piece.n_obs
    return matrix


def gene_id(token: int) -> str:
    """The Ensembl-like id of gene token ``token``: ``ENSG`` and 11 digits."""
    return f"ENSG{token:011d}"


def write_gene_files(
    root: Path,
    *,
    tokens: Sequence[int],
    symbols: Sequence[str],
    counts: sparse.spmatrix,
    obs: pd.DataFrame,
    split: str = "train",
) -> None:
    """Write the gene files the perturb and grn stages read.

    ``root/dict/token_dictionary.pkl`` (``<pad>`` 0, ``<mask>`` 1, ``gene_id(t)`` -> ``t``)
    and the count matrix ``root/ensembl.h5ad`` (``counts``: cells by genes ``tokens``, with
    ``ensembl_id`` and ``gene_symbol`` in ``var``) with its cell table
    ``root/sampled/<split>.parquet`` (``obs``), as :func:`write_sampled_splits` writes them.

    Parameters
    ----------
    root
        Project folder.
    tokens
        Gene tokens, in the order of the columns of ``counts``.
    symbols
        Gene symbol of each token.
    counts
        Cells by genes.
    obs
        Cell annotation, indexed by cell id.
    split
        Name of the cell table.
    """
    genes = [gene_id(t) for t in tokens]
    token_dictionary = {"<pad>": 0, "<mask>": 1, **dict(zip(genes, tokens, strict=True))}
    (root / "dict").mkdir()
    with (root / "dict" / "token_dictionary.pkl").open("wb") as fh:
        pickle.dump(token_dictionary, fh)
    var = pd.DataFrame({"ensembl_id": genes, "gene_symbol": list(symbols)}, index=genes)
    write_sampled_splits(root, {split: ad.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var)})


# ------------------------------------------------------------------------------------------
# Models


def tiny_bert_config(vocab_size: int, *, hidden_size: int = 32, **extra: Any) -> BertConfig:
    """A 2-layer, 2-head ``BertConfig`` (relu, 64 positions, pad token 0).

    Parameters
    ----------
    vocab_size
        Number of tokens.
    hidden_size
        Width of the hidden states.
    **extra
        More ``BertConfig`` arguments (``num_labels``, ``id2label``, ...).
    """
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_act="relu",
        pad_token_id=0,
        **extra,
    )


def save_random_base_model(path: Path, vocab_size: int, *, seed: int = 0) -> None:
    """Seed torch with ``seed`` and save a random ``BertForMaskedLM(tiny_bert_config())``."""
    torch.manual_seed(seed)
    BertForMaskedLM(tiny_bert_config(vocab_size)).save_pretrained(path)


def tiny_geneformer_config(
    vocab_size: int, *, num_hidden_layers: int = 2, dropout: float = 0.0
) -> BertConfig:
    """Geneformer's architecture at 32 wide, 4 heads, 64 positions.

    Parameters
    ----------
    vocab_size
        Number of tokens.
    num_hidden_layers
        Encoder layers.
    dropout
        Dropout on hidden states and on attention probabilities.
    """
    return geneformer_bert_config(
        vocab_size=vocab_size,
        max_position_embeddings=64,
        num_hidden_layers=num_hidden_layers,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        dropout=dropout,
        attention_dropout=dropout,
    )


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (tiny models run fastest so), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_on_ranks(target: Any, world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Run ``target(rank, world_size, port, *args, queue)`` in ``world_size`` spawned processes,
    as a launcher would start them (each joins a gloo group on 127.0.0.1 at ``port`` itself),
    and return what each put on ``queue``, sorted. Every process must exit cleanly."""
    from rosmap_geneformer import distributed

    port = distributed.free_port()
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=target, args=(rank, world_size, port, *args, queue))
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    reports = sorted(queue.get(timeout=timeout) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return reports


# ------------------------------------------------------------------------------------------
# Params and stages


def project_paths(root: Path, *keys: str) -> dict[str, str]:
    """The ``paths`` entries ``keys`` of a tiny project in ``root``, laid out as
    ``PROJECT_LAYOUT``, in the order given."""
    return {key: str(root / PROJECT_LAYOUT[key]) for key in keys}


def write_params(folder: Path, params: Mapping[str, Any], *, sort_keys: bool = True) -> Path:
    """Write ``params`` to ``folder/params.yaml`` (making ``folder``) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(dict(params), sort_keys=sort_keys))
    return path


def load_stage(script: Path) -> ModuleType:
    """Import the stage script ``script`` as a fresh module (its ``__main__`` block not run)."""
    spec = importlib.util.spec_from_file_location(f"{script.stem}_stage", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(script: Path, *args: str) -> None:
    """Run a stage script in this process, as ``python script args``."""
    load_stage(script).main(list(args))


def run_stage_process(script: Path, params: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python script --params params`` from the project root on one thread, with a fixed
    hash seed; capture its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, str(script), "--params", str(params)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def start_stage(
    command: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``command`` in ``cwd``, its stdout and stderr merged into one text pipe."""
    return subprocess.Popen(
        list(command),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
