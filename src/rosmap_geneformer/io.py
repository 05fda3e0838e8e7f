"""Validated, atomic reading and writing of the pipeline's files.

Every writer goes through :func:`atomic_output`: it writes to a hidden temporary path beside the
target and renames it into place only on success, so an interrupted stage leaves no half-file that
DVC could cache.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import json
import logging
import lzma
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from rosmap_geneformer.errors import InputError, MissingInputError

logger = logging.getLogger(__name__)

# Genes checked per block when validating that X holds raw counts.
_CHECK_ROWS = 4096
# The first bytes of a Git LFS pointer file (what a clone without `git lfs pull` holds).
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
# How each delimiter is named in messages.
_DELIMITERS = {"\t": "tab-separated (TSV)", ",": "comma-separated (CSV)"}
# Compression suffixes pandas reads by itself, and how to open them for a look at the header.
_COMPRESSED: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_MISSING_HINT = "Run the stage that writes it (`dvc repro`) or check paths in params.yaml."


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
    """Read an AnnData; a missing, empty, truncated or LFS-pointer file is refused by name."""
    path = check_h5ad_file(path)
    return ad.read_h5ad(path, backed="r" if backed else None)


# --------------------------------------------------------------------------------------------
# Recognising what a file holds before parsing it
# --------------------------------------------------------------------------------------------
def check_input_file(path: str | Path, *, what: str, hint: str = _MISSING_HINT) -> Path:
    """Refuse a file that is missing, empty (0 bytes) or a Git LFS pointer.

    Parameters
    ----------
    path
        The file.
    what
        What the file should hold, for messages (``"donor metadata"``).
    hint
        How to get the file when it is missing.

    Returns
    -------
    ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    MissingInputError
        When there is no such file.
    InputError
        When it is empty or an LFS pointer.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: {what} file not found. {hint}"
        raise MissingInputError(msg)
    if path.stat().st_size == 0:
        msg = f"{path}: the {what} file is empty (0 bytes); re-create it or fetch it (`dvc pull`)."
        raise InputError(msg)
    check_not_lfs_pointer(path, what=what)
    return path


def check_not_lfs_pointer(path: str | Path, *, what: str) -> None:
    """Refuse a Git LFS pointer (a small text file standing in for the data it names)."""
    with Path(path).open("rb") as fh:
        head = fh.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        msg = (
            f"{path} is a Git LFS pointer, not the {what}; run `git lfs pull` (or `dvc pull`) "
            "to fetch the data."
        )
        raise InputError(msg)


def check_h5ad_file(path: str | Path, *, what: str = "h5ad", hint: str = _MISSING_HINT) -> Path:
    """Refuse a file that is not a readable HDF5 ``.h5ad``: missing, empty, LFS pointer, other
    format, or truncated (the file is opened once with h5py to find out).

    Returns
    -------
    ``path`` as a :class:`~pathlib.Path`.
    """
    with open_h5ad(path, what=what, hint=hint):
        return Path(path)


@contextlib.contextmanager
def open_h5ad(path: str | Path, *, what: str = "h5ad", hint: str = _MISSING_HINT) -> Iterator[Any]:
    """Open an ``.h5ad`` with h5py for reading, after :func:`check_input_file`.

    A file that is not HDF5, or that h5py cannot open (truncated, damaged), is refused with an
    :class:`InputError` naming it; errors raised inside the block pass unchanged.
    """
    import h5py

    path = check_input_file(path, what=what, hint=hint)
    if not h5py.is_hdf5(path):
        with path.open("rb") as fh:
            head = fh.read(16)
        reason = f"not HDF5, it starts with {head!r}"
        msg = f"{path}: not a readable .h5ad ({reason}); re-create it or `dvc pull`."
        raise InputError(msg)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        msg = (
            f"{path}: not a readable .h5ad (truncated or not HDF5: {_short_reason(err)}); "
            "re-create it or `dvc pull`."
        )
        raise InputError(msg) from err
    with handle:
        yield handle


def _short_reason(error: BaseException) -> str:
    """h5py's reason in brackets (``truncated file: eof = ...``), else the whole message."""
    text = str(error)
    if "(" in text and text.endswith(")"):
        text = text[text.index("(") + 1 : -1]
    return text[:160]


def check_matrix_shape(n_obs: int, n_vars: int, *, source: str | Path) -> None:
    """Refuse a count matrix without cells or without genes, naming the file and the shape."""
    if n_obs == 0 or n_vars == 0:
        empty = "cells" if n_obs == 0 else "genes"
        msg = (
            f"{source}: the count matrix has no {empty} ({n_obs} cells x {n_vars} genes); "
            "re-export the counts with cells in rows and genes in columns, or `dvc pull`."
        )
        raise InputError(msg)


def delimiter_of(path: str | Path) -> str:
    """The delimiter a table's name implies: ``,`` for ``.csv`` (also ``.csv.gz``), else a tab."""
    suffixes = [s for s in Path(path).suffixes if s.lower() not in (*_COMPRESSED, ".zip")]
    return "," if suffixes and suffixes[-1].lower() == ".csv" else "\t"


def _header_line(path: Path) -> str | None:
    """The first line of a (possibly compressed) text file; ``None`` when it cannot be peeked."""
    opener = _COMPRESSED.get(path.suffix.lower(), open)
    if path.suffix.lower() == ".zip":
        return None
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            return fh.readline(65_536).rstrip("\r\n")
    except (OSError, EOFError, lzma.LZMAError):
        return None


def check_delimiter(path: str | Path, *, sep: str, what: str, by_name: bool = True) -> None:
    """Refuse a table whose header is split by the other delimiter (a CSV read as TSV, ...).

    ``by_name`` says that the delimiter follows the file's name (:func:`delimiter_of`), so
    renaming the file is offered as a fix too.

    Raises
    ------
    InputError
        Naming the file, what it looks like, what is expected and how to convert it.
    """
    if sep not in _DELIMITERS:
        return
    path = Path(path)
    header = _header_line(path)
    other = "," if sep == "\t" else "\t"
    if not header or sep in header or other not in header:
        return
    shown = header if len(header) <= 60 else f"{header[:57]}..."
    if sep == "\t":
        fix = "save it tab-separated (pandas: pd.read_csv(f, dtype=str).to_csv(f, sep='\\t', "
        fix += "index=False))"
        rename = ".csv"
    else:
        fix, rename = "save it comma-separated", ".tsv"
    if by_name:
        fix += f", or name it {rename} and set that name in params.yaml"
    msg = (
        f"{path}: looks {_DELIMITERS[other]} (header {shown!r}), but the {what} is read as "
        f"{_DELIMITERS[sep]}; {fix}."
    )
    raise InputError(msg)


def read_delimited(
    path: str | Path, *, what: str, sep: str | None = None, **options: Any
) -> pd.DataFrame:
    """Parse a delimited text table after checking what the file holds.

    Refuses a missing or empty file, a Git LFS pointer, a table written with the other delimiter
    (:func:`check_delimiter`), and text pandas cannot parse, each with the file's name.

    Parameters
    ----------
    path
        The table (``.tsv``, ``.txt``, ``.csv``, optionally compressed).
    what
        What the table is, for messages.
    sep
        The delimiter; by default from the name (:func:`delimiter_of`).
    **options
        Passed to :func:`pandas.read_csv`.
    """
    path = check_input_file(path, what=what, hint="Check the paths in params.yaml (paths, raw).")
    by_name = sep is None
    sep = delimiter_of(path) if sep is None else sep
    check_delimiter(path, sep=sep, what=what, by_name=by_name)
    try:
        return pd.read_csv(path, sep=sep, **options)
    except pd.errors.EmptyDataError as err:
        msg = f"{path}: the {what} file has no header and no rows; re-create it or `dvc pull`."
        raise InputError(msg) from err
    except pd.errors.ParserError as err:
        msg = (
            f"{path}: cannot read the {what} as {_DELIMITERS.get(sep, repr(sep))} text "
            f"({str(err).strip()}); fix that line."
        )
        raise InputError(msg) from err
    except UnicodeDecodeError as err:
        msg = (
            f"{path}: the {what} is not UTF-8 text ({err.reason} at byte {err.start}); is it a "
            "binary or compressed file under a text name? Save it as UTF-8 text."
        )
        raise InputError(msg) from err


def check_ids(
    frame: pd.DataFrame, columns: Iterable[str], *, source: str | Path, what: str
) -> None:
    """Refuse missing or blank values in id columns (library, donor, cell), counting them.

    Rows are numbered as lines of the file (the header is line 1).
    """
    for column in columns:
        values = frame[column]
        blank = values.isna().to_numpy() | (values.astype(str).str.strip() == "").to_numpy()
        if blank.any():
            lines = [int(i) + 2 for i in blank.nonzero()[0][:5]]
            msg = (
                f"{source}: column {column!r} of the {what} is empty in {int(blank.sum())} of "
                f"{len(frame)} row(s) (file lines {lines}); every row needs an id there: fill "
                "them in or delete those rows."
            )
            raise InputError(msg)


def read_table(
    path: str | Path,
    *,
    required: Sequence[str],
    what: str,
    dtype: Any = None,
    ids: Sequence[str] = (),
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
    ids
        Id columns (donor, library, cell): read as strings, so that ``00000001`` stays
        ``"00000001"``, and refused when a row has none (:func:`check_ids`). They are also
        required.

    Raises
    ------
    MissingInputError
        When the file does not exist.
    InputError
        When it is empty, an LFS pointer, written with the other delimiter, lacks a required
        column or has a row without an id.
    """
    path = Path(path)
    if ids and (dtype is None or isinstance(dtype, Mapping)):
        dtype = {**(dtype or {}), **dict.fromkeys(ids, str)}
    frame = read_delimited(path, what=what, dtype=dtype, keep_default_na=True)
    missing = [c for c in (*required, *ids) if c not in frame.columns]
    if missing:
        msg = (
            f"{path}: {what} lacks column(s) {list(dict.fromkeys(missing))}; it has "
            f"{list(frame.columns)}. Rename the column in the file or set its name under "
            "data.columns in params.yaml."
        )
        raise InputError(msg)
    check_ids(frame, ids, source=path, what=what)
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
        raise MissingInputError(msg)
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
        raise InputError(msg)
    if values.min() < 0:
        msg = (
            f"{source}: X has negative values (min {values.min():g}); it looks scaled or "
            "centred. Provide raw integer UMI counts in X (e.g. from layers['counts'] or .raw)."
        )
        raise InputError(msg)
    fractional = values[values != np.round(values)]
    if fractional.size:
        msg = (
            f"{source}: X holds non-integer values (e.g. {fractional[0]:g}), so it looks "
            "normalised or log-transformed. Geneformer ranks raw counts: put raw integer UMI "
            "counts in X (e.g. from layers['counts'] or .raw) and rerun."
        )
        raise InputError(msg)


def check_unique_obs_names(adata: ad.AnnData | pd.Index, *, source: str | Path) -> None:
    """Refuse duplicate cell names (of an AnnData, or given as an index), listing a few."""
    names = pd.Index(adata.obs_names if isinstance(adata, ad.AnnData) else adata)
    if not names.is_unique:
        dups = names[names.duplicated()].unique()
        msg = (
            f"{source}: {len(dups)} duplicate cell name(s) in obs_names, e.g. {list(dups[:5])}. "
            "Cell names must be unique (`<library>_<barcode>-1`); prefix barcodes with their library."
        )
        raise InputError(msg)


def check_obs_columns(adata: ad.AnnData, columns: Iterable[str], *, source: str | Path) -> None:
    """Refuse an AnnData whose ``obs`` lacks any of ``columns``."""
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        msg = (
            f"{source}: obs lacks column(s) {missing}; it has {list(adata.obs.columns)}. "
            "Add the column, or set its name under data.columns in params.yaml."
        )
        raise InputError(msg)
