"""Validated, atomic reading and writing of the pipeline's files.

Every writer goes through :func:`atomic_output`: it writes to a hidden temporary path beside the
target and renames it into place only on success, so an interrupted stage leaves no half-file that
DVC could cache.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

logger = logging.getLogger(__name__)

# Genes checked per block when validating that X holds raw counts.
_CHECK_ROWS = 4096


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` when the block exits cleanly.

    Works for files and for directories (such as a ``datasets`` ``save_to_disk`` folder). The
    temporary path is removed when the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    _remove(tmp)
    _remove_stale_temporaries(path)
    try:
        yield tmp
        if not tmp.exists():
            msg = f"{path}: the writer produced nothing at {tmp}."
            raise RuntimeError(msg)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        tmp.replace(path)
    finally:
        _remove(tmp)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove what killed writers of ``path`` left behind (``.tmp-<name>-<pid>`` of processes
    that no longer run): a leftover inside a folder that another stage reads (``dvclive/``)
    would change that folder's hash and make DVC rerun the stage."""
    prefix = f".tmp-{path.name}-"
    for stale in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = stale.name.removeprefix(prefix)
        if pid.isdigit() and not _is_running(int(pid)):
            logger.info("removing %s, left by an interrupted run", stale)
            _remove(stale)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _to_builtin(obj: Any) -> Any:
    """Convert numpy and pandas scalars so that ``json`` can write them."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    msg = f"cannot write {type(obj).__name__} to JSON"
    raise TypeError(msg)


def write_json(obj: Mapping[str, Any], path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically, with a trailing newline."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_to_builtin, allow_nan=False) + "\n")


def write_tsv(frame: pd.DataFrame, path: str | Path, *, index: bool = False) -> None:
    """Write a tab-separated table atomically."""
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=index, lineterminator="\n")


def write_lines(lines: Iterable[str], path: str | Path) -> None:
    """Write one item per line, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines))


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically and close it.

    The PNG carries no software or date metadata, so the same figure gives the same bytes.
    """
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def write_h5ad(adata: ad.AnnData, path: str | Path) -> None:
    """Write an AnnData atomically, uncompressed, with CSR ``X``."""
    if sparse.issparse(adata.X) and not sparse.isspmatrix_csr(adata.X):
        adata.X = sparse.csr_matrix(adata.X)
    with atomic_output(path) as tmp:
        adata.write_h5ad(tmp)
    logger.info("wrote %s (%d cells x %d genes)", path, adata.n_obs, adata.n_vars)


def read_h5ad(path: str | Path, *, backed: bool = False) -> ad.AnnData:
    """Read an AnnData, with an error that says which stage makes the file when it is missing."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: file not found. Run the stage that writes it (`dvc repro`) or check paths in params.yaml."
        raise FileNotFoundError(msg)
    return ad.read_h5ad(path, backed="r" if backed else None)


def read_table(
    path: str | Path, *, required: Sequence[str], what: str, dtype: Any = None
) -> pd.DataFrame:
    """Read a TSV (or CSV, by suffix) and check that the required columns exist.

    Parameters
    ----------
    path
        The table.
    required
        Columns that must be present.
    what
        What the table is, for error messages (``"donor metadata"``).
    dtype
        Passed to :func:`pandas.read_csv`.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: {what} file not found. Check the paths in params.yaml (paths, raw)."
        raise FileNotFoundError(msg)
    sep = "," if path.suffix == ".csv" else "\t"
    frame = pd.read_csv(path, sep=sep, dtype=dtype, keep_default_na=True)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        msg = (
            f"{path}: {what} lacks column(s) {missing}; it has {list(frame.columns)}. "
            "Rename the column in the file or set its name under data.columns in params.yaml."
        )
        raise ValueError(msg)
    return frame


def read_dataset(path: str | Path) -> Any:
    """Load a ``save_to_disk`` dataset without ever writing into its folder.

    ``datasets`` caches the results of ``select``/``map`` as files beside the dataset's own
    Arrow files. In a pipeline that folder is a DVC output of another stage: a cache file
    there would change its hash and make DVC rerun everything downstream. Caching is turned
    off for the process, so such results go to temporary folders instead.
    """
    import datasets

    path = Path(path)
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        msg = f"{path}: not a saved dataset. Run the stage that writes it (`dvc repro`)."
        raise FileNotFoundError(msg)
    datasets.disable_caching()
    return datasets.load_from_disk(str(path))


def _iter_blocks(matrix: Any, n_rows: int) -> Iterator[Any]:
    for start in range(0, n_rows, _CHECK_ROWS):
        yield matrix[start : min(start + _CHECK_ROWS, n_rows)]


def check_raw_counts(adata: ad.AnnData, *, source: str | Path) -> None:
    """Refuse a matrix that is not raw, non-negative integer counts.

    Works on in-memory and backed AnnData, block by block.

    Raises
    ------
    ValueError
        Naming the file, the first offending value and the fix.
    """
    for block in _iter_blocks(adata.X, adata.n_obs):
        check_raw_values(block, source=source)


def check_raw_values(block: Any, *, source: str | Path) -> None:
    """Refuse a block of counts (sparse or dense) that is not raw, non-negative integers.

    Raises
    ------
    ValueError
        Naming the file, the first offending value and the fix.
    """
    values = block.data if sparse.issparse(block) else np.asarray(block).ravel()
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        msg = f"{source}: X contains NaN or infinite values. Provide raw integer UMI counts in X."
        raise ValueError(msg)
    if values.min() < 0:
        msg = (
            f"{source}: X has negative values (min {values.min():g}); it looks scaled or "
            "centred. Provide raw integer UMI counts in X (e.g. from layers['counts'] or .raw)."
        )
        raise ValueError(msg)
    fractional = values[values != np.round(values)]
    if fractional.size:
        msg = (
            f"{source}: X holds non-integer values (e.g. {fractional[0]:g}), so it looks "
            "normalised or log-transformed. Geneformer ranks raw counts: put raw integer UMI "
            "counts in X (e.g. from layers['counts'] or .raw) and rerun."
        )
        raise ValueError(msg)


def check_unique_obs_names(adata: ad.AnnData | pd.Index, *, source: str | Path) -> None:
    """Refuse duplicate cell names (of an AnnData, or given as an index), listing a few."""
    names = pd.Index(adata.obs_names if isinstance(adata, ad.AnnData) else adata)
    if not names.is_unique:
        dups = names[names.duplicated()].unique()
        msg = (
            f"{source}: {len(dups)} duplicate cell name(s) in obs_names, e.g. {list(dups[:5])}. "
            "Cell names must be unique (`<library>_<barcode>-1`); prefix barcodes with their library."
        )
        raise ValueError(msg)


def check_obs_columns(adata: ad.AnnData, columns: Iterable[str], *, source: str | Path) -> None:
    """Refuse an AnnData whose ``obs`` lacks any of ``columns``."""
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        msg = (
            f"{source}: obs lacks column(s) {missing}; it has {list(adata.obs.columns)}. "
            "Add the column, or set its name under data.columns in params.yaml."
        )
        raise ValueError(msg)
