"""Tokenizer throughput and memory benchmark (not a test): ``python benchmarks/tokenizer.py``.

Generates raw counts like the reference run in ``geneformer-spec.md`` section 2.8 (20,000 genes
taken from the gc30M token dictionary, about 2,050 non-zero genes per cell, float32 CSR, ~1% of
cells with ``filter_pass`` 0), written to h5ad in chunks outside the timing. Styles:

- V1: gc30M dictionaries, ``model_input_size`` 2048, no special tokens;
- V2: a synthetic V2-style pair (the gc30M genes renumbered after ``<pad>`` 0, ``<mask>`` 1,
  ``<cls>`` 2, ``<eos>`` 3, gc30M medians; the real gc104M medians are not available),
  ``model_input_size`` 4096 with ``<cls>``/``<eos>``.

Two sides, each run in its own interpreter measured by :mod:`harness` (waits for a quiet
machine, records the load, samples the peak RSS of the process tree):

- ``ours``: the project's ``tokenize_h5ad`` at each ``--nproc``;
- ``reference``: Geneformer's steps ported (``tests/geneformer/tokenizer_reference.py``:
  ``scipy_expression_tokenize``, Geneformer's own scipy matrix expression on chunks, then a
  per-row numpy default argsort, ``ties="numpy"``, as Geneformer ranks; ours orders exact ties
  by token id, so cells with ties may differ in the order of those genes only), after reading
  the whole h5ad with anndata as Geneformer does, written with
  ``datasets.Dataset.from_dict`` + ``save_to_disk``; one process. A port, not Geneformer itself
  (no per-example ``map``), run only up to ``--reference-cells`` cells (it holds every cell in
  memory).

Within each repeat the sides run one after another, so drifting load hits both alike; the
speed-up is only computed between the two sides of this run (``ours`` at ``nproc`` 1 over
``reference``), from the best runs and for each repeat. Geneformer's own published figure (spec
2.8, another machine) is kept as a quoted figure and divided into nothing.

Timed (``total_s``, the basis of ``cells_per_s``): loading the dictionaries, reading, encoding
and writing the dataset; imports apart (``imports_s``; the harness's ``process.wall_s`` includes
them). Results go to ``reports/benchmarks/tokenizer.json``; the dictionaries are read from
``$GENEFORMER_DICTIONARY_DIR`` (default ``../shared/geneformer_dictionaries``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

ROOT = harness.ROOT
STYLES = {"V1": (2048, False), "V2": (4096, True)}  # model_input_size, special tokens
COLUMNS = ["cell_id", "patient_id", "cell_type", "ad_status"]
GENEFORMER_QUOTED = harness.quoted(
    {
        "setup": "Geneformer TranscriptomeTokenizer, h5ad, nproc=1, chunk_size 512, 20,000 cells "
        "x 20,000 genes (19,795 pass filter_pass)",
        "V1": {"cells_per_s": 1170, "total_s": 16.9, "wall_incl_imports_s": 24.7},
        "V2": {"cells_per_s": 1210, "total_s": 16.4, "wall_incl_imports_s": 22.8},
        "peak_rss_mb": {"V1": 1360, "V2": 2320},
    },
    source="../shared/reference/geneformer-spec.md section 2.8 (a 2-core machine of this "
    "project's kind, earlier; CPU model, sort dispatch and load not recorded)",
)


def _library() -> tuple[Any, Any]:
    """The library functions this benchmark runs (the one place to update if modules move)."""
    from rosmap_geneformer.geneformer.dictionaries import load_dictionaries
    from rosmap_geneformer.geneformer.tokenizer import tokenize_h5ad

    return load_dictionaries, tokenize_h5ad


def dictionary_dir() -> Path:
    """``$GENEFORMER_DICTIONARY_DIR`` or ``../shared/geneformer_dictionaries``."""
    env = os.environ.get("GENEFORMER_DICTIONARY_DIR")
    return Path(env) if env else (ROOT / ".." / "shared" / "geneformer_dictionaries").resolve()


def make_dictionaries(workdir: Path) -> dict[str, dict[str, Path]]:
    """Paths of the V1 (gc30M) pair and of a synthetic V2-style pair built from it."""
    source = dictionary_dir()
    v1_tokens = source / "token_dictionary_gc30M.pkl"
    v1_medians = source / "gene_median_dictionary_gc30M.pkl"
    if not v1_tokens.is_file():
        sys.exit(f"{v1_tokens}: not found; set GENEFORMER_DICTIONARY_DIR to the dictionary folder.")
    with v1_tokens.open("rb") as fh:
        tokens = pickle.load(fh)
    genes = [g for g in tokens if not g.startswith("<")]
    v2_tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    v2_tokens.update({g: 4 + i for i, g in enumerate(sorted(genes))})
    v2_path = workdir / "token_dictionary_v2_synthetic.pkl"
    with v2_path.open("wb") as fh:
        pickle.dump(v2_tokens, fh, protocol=4)
    return {
        "V1": {"tokens": v1_tokens, "medians": v1_medians},
        "V2": {"tokens": v2_path, "medians": v1_medians},
    }


def generate(path: Path, *, n_cells: int, n_genes: int, genes_per_cell: int, seed: int) -> None:
    """Write a raw-count h5ad in the anndata layout, chunk by chunk (bounded memory)."""
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    with (dictionary_dir() / "token_dictionary_gc30M.pkl").open("rb") as fh:
        vocabulary = [g for g in pickle.load(fh) if not g.startswith("<")]
    gene_ids = rng.choice(np.array(vocabulary), size=n_genes, replace=False)
    # Some genes are far more often detected than others, as in real data.
    weight = rng.lognormal(0.0, 1.5, n_genes)
    tmp = path.with_suffix(".part")
    chunk = 2000
    with h5py.File(tmp, "w") as fh:
        fh.attrs["encoding-type"] = "anndata"
        fh.attrs["encoding-version"] = "0.1.0"
        group = fh.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_cells, n_genes])
        data = group.create_dataset(
            "data", shape=(0,), maxshape=(None,), dtype="f4", chunks=(1 << 20,)
        )
        indices = group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype="i4", chunks=(1 << 20,)
        )
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        n_counts = np.zeros(n_cells, dtype=np.float32)
        filled = 0
        for start in range(0, n_cells, chunk):
            end = min(start + chunk, n_cells)
            cols, vals = [], []
            for i in range(start, end):
                k = int(np.clip(rng.normal(genes_per_cell, 150), 200, n_genes))
                # Gumbel top-k: k distinct genes drawn with probability ~ weight.
                keys = np.log(weight) - np.log(-np.log(rng.random(n_genes)))
                picked = np.sort(np.argpartition(-keys, k)[:k])
                counts = rng.geometric(0.55, k).astype(np.float32)
                cols.append(picked)
                vals.append(counts)
                indptr[i + 1] = indptr[i] + k
                n_counts[i] = counts.sum() * 1.15 + rng.integers(0, 50)
            cols_arr, vals_arr = np.concatenate(cols), np.concatenate(vals)
            data.resize((filled + vals_arr.size,))
            indices.resize((filled + vals_arr.size,))
            data[filled:] = vals_arr
            indices[filled:] = cols_arr.astype(np.int32)
            filled += vals_arr.size
        group.create_dataset("indptr", data=indptr)
        obs = pd.DataFrame(
            {
                "n_counts": n_counts,
                "filter_pass": (rng.random(n_cells) > 0.01).astype(np.int64),
                "patient_id": pd.Categorical(
                    [f"D{int(i):03d}" for i in rng.integers(0, 60, n_cells)]
                ),
                "cell_type": pd.Categorical(
                    rng.choice(["Exc", "Inh", "Ast", "Oli", "OPC", "Mic"], n_cells)
                ),
                "ad_status": pd.Categorical(rng.choice(["AD", "control"], n_cells)),
            },
            index=pd.Index([f"L{i // 5000:03d}_{i:08d}-1" for i in range(n_cells)]),
        )
        var = pd.DataFrame({"ensembl_id": gene_ids}, index=pd.Index(gene_ids))
        write_elem(fh, "obs", obs)
        write_elem(fh, "var", var)
        for key in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
            write_elem(fh, key, {})
    tmp.rename(path)


# ------------------------------------------------------------------------------------------
# Worker (one side, one configuration per process)


def _cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _ours(config: dict[str, Any]) -> dict[str, Any]:
    """Tokenize with the project's ``tokenize_h5ad``; the timing starts after the imports."""
    load_dictionaries, tokenize_h5ad = _library()
    report = tokenize_h5ad(
        config["input"],
        config["output"],
        dictionaries=load_dictionaries(config["tokens"], config["medians"]),
        model_input_size=config["model_input_size"],
        special_tokens=config["special_tokens"],
        columns=COLUMNS,
        chunk_size=config["chunk_size"],
        nproc=config["nproc"],
    )
    return {
        "cells_tokenized": report["cells"]["tokenized"],
        "median_length": report["length"].get("median"),
        "input_ids_dtype": report["output"]["input_ids_dtype"],
    }


def _reference_tokenizer() -> Any:
    """``scipy_expression_tokenize`` of ``tests/geneformer/tokenizer_reference.py``."""
    sys.path.insert(0, str(ROOT / "tests" / "geneformer"))
    from tokenizer_reference import scipy_expression_tokenize

    return scipy_expression_tokenize


def _reference(config: dict[str, Any]) -> dict[str, Any]:
    """Geneformer's steps, ported: read all, scipy expression per chunk, rank, write."""
    import anndata
    import datasets
    import numpy as np

    scipy_expression_tokenize = _reference_tokenizer()
    with Path(config["tokens"]).open("rb") as fh:
        token_dict = pickle.load(fh)
    with Path(config["medians"]).open("rb") as fh:
        median_dict = pickle.load(fh)
    adata = anndata.read_h5ad(config["input"])  # whole file in memory, as Geneformer reads it
    ids = scipy_expression_tokenize(
        adata,
        token_dict,
        median_dict,
        model_input_size=config["model_input_size"],
        special_tokens=config["special_tokens"],
        chunk_size=config["chunk_size"],
        ties="numpy",  # Geneformer's argsort(-v); its order of exact ties depends on the CPU
    )
    columns: dict[str, Any] = {"input_ids": ids}
    obs = adata.obs[adata.obs["filter_pass"] == 1]
    if len(obs) == len(ids):  # no empty cells: labels line up with the output rows
        columns["cell_id"] = obs.index.tolist()
        columns.update({c: obs[c].astype(str).tolist() for c in COLUMNS[1:]})
    columns["length"] = [len(x) for x in ids]
    datasets.Dataset.from_dict(columns).save_to_disk(config["output"])
    return {
        "cells_tokenized": len(ids),
        "median_length": float(np.median(columns["length"])),
    }


def _agreement(ours_path: str, reference_path: str, n: int = 200) -> dict[str, Any]:
    """How many of the first ``n`` cells both sides tokenized identically (outside timing).

    ``cells_same_tokens_other_order``: the same tokens in another order, which is what the order
    of exact ties (token id in ours, the CPU's sort kernel in the reference) gives; where
    truncation cuts a tie, the kept tokens can differ too. The tests check that ties are the only
    difference (``compare_up_to_ties``).
    """
    import datasets

    ours = datasets.load_from_disk(ours_path)["input_ids"][:n]
    ref = datasets.load_from_disk(reference_path)["input_ids"][:n]
    pairs = [(list(a), list(b)) for a, b in zip(ours, ref, strict=False)]
    same = sum(a == b for a, b in pairs)
    reordered = sum(a != b and sorted(a) == sorted(b) for a, b in pairs)
    return {
        "cells_compared": len(pairs),
        "cells_identical": same,
        "cells_same_tokens_other_order": reordered,
    }


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """Run one side on one input, timing everything after the imports.

    Parameters
    ----------
    config
        ``side`` (``ours`` or ``reference``), ``input``, ``output``, ``tokens``, ``medians``,
        ``model_input_size``, ``special_tokens``, ``chunk_size``, ``nproc`` and, for the
        reference, ``compare_with`` (ours' output, or None).

    Returns
    -------
    dict
        Times, rates and what was written.
    """
    import logging

    logging.basicConfig(level="WARNING")
    t_import = time.perf_counter()
    if config["side"] == "ours":
        _library()
    else:
        import anndata  # noqa: F401
        import datasets  # noqa: F401

        _reference_tokenizer()
    imports_s = time.perf_counter() - t_import
    shutil.rmtree(config["output"], ignore_errors=True)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    out = (_ours if config["side"] == "ours" else _reference)(config)
    total_s, cpu_s = time.perf_counter() - t0, _cpu_seconds() - cpu0
    cells = out["cells_tokenized"]
    result = {
        "imports_s": round(imports_s, 3),
        "total_s": round(total_s, 3),
        "cells_per_s": round(cells / total_s),
        "cpu_s": round(cpu_s, 3),
        "cells_per_cpu_s": round(cells / cpu_s),
        **out,
    }
    if config.get("compare_with") and Path(config["compare_with"]).is_dir():
        result["agreement_with_ours"] = _agreement(config["compare_with"], config["output"])
    return result


# ------------------------------------------------------------------------------------------
# Driver


def _input(workdir: Path, n_cells: int) -> Path:
    """The generated h5ad of ``n_cells`` (made once, kept in ``workdir`` for reuse)."""
    data = workdir / f"counts_{n_cells}x20000.h5ad"
    if not data.exists():
        # In a child process, so that this driver stays small.
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--generate", str(n_cells), "--generate-to", str(data)]
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"generated {data} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return data


def main(argv: list[str] | None = None) -> None:
    """Run every side, style, size and process count; write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="20000,200000", help="cell counts, comma-separated")
    parser.add_argument("--nproc", default="1,2", help="process counts of ours, comma-separated")
    parser.add_argument("--styles", default="V1,V2")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    parser.add_argument(
        "--reference-cells",
        type=int,
        default=20_000,
        help="run the reference side at cell counts up to this (0: never)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "rosmap-geneformer-bench",
        help="where generated inputs (kept for reuse) and outputs go",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "reports/benchmarks/tokenizer.json")
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--generate-to", type=Path, help=argparse.SUPPRESS)
    harness.worker_arguments(parser)
    args = parser.parse_args(argv)
    if harness.serve_worker(args, worker):
        return
    if args.generate:
        generate(
            args.generate_to, n_cells=args.generate, n_genes=20_000, genes_per_cell=2050, seed=0
        )
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    dictionaries = make_dictionaries(args.workdir)
    nprocs = [int(n) for n in args.nproc.split(",")]
    report = harness.start_report(
        "tokenizer",
        settings={
            "input": {
                "genes": 20_000,
                "non_zero_genes_per_cell": "about 2,050",
                "dtype": "float32 CSR",
                "filter_pass": "about 1% of cells 0",
            },
            "chunk_size": args.chunk_size,
            "repeats": f"{args.repeat} per configuration, sides alternating; best by cells_per_s",
            "wait_quiet_s": args.wait_quiet,
            "sides": {
                "ours": "rosmap_geneformer tokenize_h5ad",
                "reference": "Geneformer's steps ported (tests/geneformer/tokenizer_reference.py "
                "scipy_expression_tokenize; anndata.read_h5ad; datasets from_dict + "
                "save_to_disk), 1 process; not Geneformer itself",
            },
        },
        results=[],
        speedup_same_run=[],
        geneformer=GENEFORMER_QUOTED,
        targets={"cells_per_s": 20_000, "peak_rss_mb": 1024},
    )
    for n_cells in (int(c) for c in args.cells.split(",")):
        data = _input(args.workdir, n_cells)
        for style in args.styles.split(","):
            size, special = STYLES[style]
            base = {
                "input": str(data),
                "tokens": str(dictionaries[style]["tokens"]),
                "medians": str(dictionaries[style]["medians"]),
                "model_input_size": size,
                "special_tokens": special,
                "chunk_size": args.chunk_size,
            }
            configs = {f"ours_nproc{n}": {**base, "side": "ours", "nproc": n} for n in nprocs}
            if 0 < n_cells <= args.reference_cells:
                ours1 = args.workdir / f"out_ours_{style}_{n_cells}_1.dataset"
                configs["reference"] = {
                    **base,
                    "side": "reference",
                    "nproc": 1,
                    "compare_with": str(ours1) if 1 in nprocs else None,
                }
            for config in configs.values():
                config["output"] = str(
                    args.workdir
                    / f"out_{config['side']}_{style}_{n_cells}_{config['nproc']}.dataset"
                )
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
            for _ in range(args.repeat):
                for name, config in configs.items():
                    run = harness.run_worker(__file__, config, wait_quiet_s=args.wait_quiet)
                    runs[name].append(run)
                    print(
                        f"{style} {n_cells} {name}: {run['cells_per_s']} cells/s "
                        f"(busy CPUs before {run['process']['busy_cpus_before']}, "
                        f"load {run['process']['loadavg_before']})",
                        file=sys.stderr,
                    )
            for name, config in configs.items():
                best = harness.best_of(runs[name], "cells_per_s")
                report["results"].append(
                    {
                        "style": style,
                        "cells": n_cells,
                        "side": config["side"],
                        "nproc": config["nproc"],
                        **best,
                    }
                )
            if "reference" in runs and "ours_nproc1" in runs:
                ours, ref = runs["ours_nproc1"], runs["reference"]
                report["speedup_same_run"].append(
                    {
                        "style": style,
                        "cells": n_cells,
                        "compared": "ours (nproc 1) / reference, cells_per_s, same input, "
                        "same run, sides alternating",
                        "best_of_runs": harness.ratio(
                            max(r["cells_per_s"] for r in ours), max(r["cells_per_s"] for r in ref)
                        ),
                        "cpu_normalised_best_of_runs": harness.ratio(
                            max(r["cells_per_cpu_s"] for r in ours),
                            max(r["cells_per_cpu_s"] for r in ref),
                        ),
                        "each_repeat": [
                            harness.ratio(a["cells_per_s"], b["cells_per_s"])
                            for a, b in zip(ours, ref, strict=True)
                        ],
                    }
                )
            harness.write_json(report, args.output)  # keep what is measured so far
    harness.finish_report(report, args.output)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
