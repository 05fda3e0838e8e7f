"""The one count matrix: read by rows, chunk by chunk, and written by appending rows.

ROSMAP holds 2.66 million nuclei: no stage may hold the whole matrix. ``convert_genes`` writes the
matrix once (:func:`streamed_h5ad`); the stages after it pass *cell tables* (one row per cell:
id, donor, library, QC metrics and fate, labels, and ``matrix_row``, the cell's row in that
matrix) and read the counts of the cells they need with :class:`SelectedRows`, a chunk at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from rosmap_geneformer.errors import InputError, MissingInputError
from rosmap_geneformer.io import atomic_output, check_matrix_shape, open_h5ad

# The column of a cell table that holds each cell's row in the count matrix.
MATRIX_ROW = "matrix_row"
# Rows whose stored values lie closer than this are read in one request (fewer, larger reads).
_MERGE_GAP = 1 << 16
_H5AD_HINT = "Run the stage that writes it (`dvc repro`) or check paths in params.yaml."


def check_count_values(values: np.ndarray, *, source: str | Path) -> float | None:
    """Refuse values that are not finite, non-negative integers (log-normalised, scaled, ...).

    Returns
    -------
    The smallest value (``None`` when there is none).
    """
    if values.size == 0:
        return None
    if values.dtype.kind not in "iuf":
        msg = f"{source}: X has dtype {values.dtype}; expected raw counts (integer or float)."
        raise InputError(msg)
    low, high = values.min(), values.max()
    if values.dtype.kind == "f" and not (np.isfinite(low) and np.isfinite(high)):
        msg = f"{source}: X contains NaN or infinite values. Provide raw integer UMI counts in X."
        raise InputError(msg)
    if low < 0:
        msg = (
            f"{source}: X has negative values (min {low:g}); it looks scaled or centred. "
            "Geneformer ranks raw counts: put raw integer UMI counts in X."
        )
        raise InputError(msg)
    if values.dtype.kind == "f":
        fractional = np.trunc(values) != values
        if fractional.any():
            example = values[np.argmax(fractional)]
            msg = (
                f"{source}: X holds non-integer values (e.g. {example:g}), so it looks normalised "
                "or log-transformed. Geneformer normalises by itself and must get raw integer UMI "
                "counts: put them in X (e.g. from layers['counts'] or .raw) and rerun."
            )
            raise InputError(msg)
    return float(low)


class H5adRows:
    """Read row chunks of ``X`` from an h5ad file with h5py, without loading the whole matrix.

    Picklable (the file is reopened lazily in each process). ``kind`` is ``"sparse"`` for a CSR
    ``X`` and ``"dense"`` for a dense one; CSC is refused because it cannot be read by rows.

    A file that is missing, empty, a Git LFS pointer, not HDF5 or truncated, or whose matrix has
    no cells or no genes, is refused when the reader is made, with the file's name: the first
    stage that reads a matrix is the one that refuses it.

    Parameters
    ----------
    path
        The h5ad file.
    """

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        self._file: Any = None
        self._buffers: dict[str, np.ndarray] = {}
        with open_h5ad(self.path, what="input h5ad", hint=_H5AD_HINT) as fh:
            if "X" not in fh:
                msg = f"{self.path}: no X in the file; it must hold the raw counts in X."
                raise InputError(msg)
            node = fh["X"]
            if isinstance(node, h5py.Dataset):
                self.kind = "dense"
                self.n_obs, self.n_vars = (int(s) for s in node.shape)
                self.dtype = node.dtype
            else:
                encoding = _text(node.attrs.get("encoding-type", node.attrs.get("h5sparse_format")))
                if encoding in ("csc_matrix", "csc"):
                    msg = (
                        f"{self.path}: X is stored as CSC, which cannot be streamed by cells. "
                        "Rewrite it as CSR (adata.X = scipy.sparse.csr_matrix(adata.X); "
                        "adata.write_h5ad(...))."
                    )
                    raise InputError(msg)
                if encoding not in ("csr_matrix", "csr"):
                    msg = (
                        f"{self.path}: unsupported X encoding {encoding!r}; expected CSR or dense."
                    )
                    raise InputError(msg)
                self.kind = "sparse"
                shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
                self.n_obs, self.n_vars = (int(s) for s in shape)
                self.dtype = node["data"].dtype
        check_matrix_shape(self.n_obs, self.n_vars, source=self.path)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_buffers"] = {}
        return state

    def _open(self) -> Any:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        return self._file

    def close(self) -> None:
        """Close the file handle of this process and drop the buffers."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buffers = {}

    def read_csr(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(data, indices, indptr)`` of rows ``start:end``, ``indptr`` starting at 0.

        ``data`` and ``indices`` are views of buffers reused by the next call.
        """
        group = self._open()["X"]
        indptr = group["indptr"][start : end + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        return (
            self._read_into(group["data"], lo, hi),
            self._read_into(group["indices"], lo, hi),
            indptr - lo,
        )

    def _read_into(self, dataset: Any, lo: int, hi: int) -> np.ndarray:
        # Reading into a reused buffer avoids allocating and page-faulting ~10 MB per chunk.
        size = hi - lo
        buffer = self._buffers.get(dataset.name)
        if buffer is None or buffer.size < size:
            buffer = np.empty(max(size, 1 << 16), dtype=dataset.dtype)
            self._buffers[dataset.name] = buffer
        if size:
            dataset.read_direct(buffer, np.s_[lo:hi], np.s_[0:size])
        return buffer[:size]

    def read(self, start: int, end: int) -> Any:
        """Rows ``start:end`` as a CSR matrix or a dense array (as stored)."""
        if self.kind == "dense":
            return self._open()["X"][start:end]
        data, indices, indptr = self.read_csr(start, end)
        return sparse.csr_matrix((data, indices, indptr), shape=(end - start, self.n_vars))


class AnnDataRows:
    """The same interface over an in-memory AnnData (CSR, CSC or dense ``X``)."""

    def __init__(self, adata: Any, *, source: str = "AnnData") -> None:
        self.adata = adata
        self.path = source
        self.kind = "sparse" if sparse.issparse(adata.X) else "dense"
        self.n_obs, self.n_vars = adata.shape
        self.dtype = adata.X.dtype

    def read_csr(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(data, indices, indptr)`` of rows ``start:end``."""
        chunk = sparse.csr_matrix(self.adata.X[start:end])
        return chunk.data, chunk.indices, chunk.indptr.astype(np.int64)

    def read(self, start: int, end: int) -> Any:
        """Rows ``start:end`` as stored (CSC rows come back as CSR)."""
        chunk = self.adata.X[start:end]
        if sparse.issparse(chunk):
            return sparse.csr_matrix(chunk)
        return np.asarray(chunk)

    def close(self) -> None:
        """Nothing to close."""


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return None if value is None else str(value)


def read_cell_table(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(obs, var)`` of an h5ad, read without touching ``X``."""
    obs, var = _read_elements(path, ("obs", "var"))
    return obs, var


def read_var(path: str | Path) -> pd.DataFrame:
    """``var`` of an h5ad, read without touching ``X`` or ``obs``."""
    return _read_elements(path, ("var",))[0]


def _read_elements(path: str | Path, names: Sequence[str]) -> list[Any]:
    """Elements ``names`` of an h5ad, after the checks of :func:`~rosmap_geneformer.io.open_h5ad`;
    a file without one of them is refused as not an AnnData file."""
    from anndata.io import read_elem

    with open_h5ad(path, hint=_H5AD_HINT) as fh:
        missing = [name for name in names if name not in fh]
        if missing:
            msg = (
                f"{path}: an HDF5 file without {' and '.join(missing)}, so not an AnnData .h5ad; "
                "write it with anndata (adata.write_h5ad) or `dvc pull`."
            )
            raise InputError(msg)
        return [read_elem(fh[name]) for name in names]


class SelectedRows(H5adRows):
    """Rows of a stored matrix picked by position, read chunk by chunk in the order given.

    The same interface as :class:`H5adRows` (``read_csr``, ``read``, ``n_obs``, picklable), over
    ``positions`` instead of every row: row ``i`` of this reader is row ``positions[i]`` of the
    file. Each read sorts its positions, fetches the stored values in as few contiguous requests
    as the gaps allow and puts the rows back in the asked order, so a chunk costs the size of its
    own rows (plus small gaps), whatever the size of the file.

    Parameters
    ----------
    path
        The h5ad (CSR or dense ``X``).
    positions
        Row numbers in the file, in the order wanted; repeats are allowed.
    """

    def __init__(self, path: str | Path, positions: Sequence[int] | np.ndarray) -> None:
        super().__init__(path)
        positions = np.asarray(positions, dtype=np.int64)
        if positions.ndim != 1:
            msg = f"{self.path}: row positions must be one-dimensional."
            raise InputError(msg)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n_obs):
            msg = (
                f"{self.path}: a cell table points at row {int(positions.max())} (or a negative "
                f"row) of a matrix with {self.n_obs} rows: the table and the matrix do not "
                "belong together. Rerun the stages after convert_genes (`dvc repro`)."
            )
            raise InputError(msg)
        self.positions = positions
        self.n_stored = self.n_obs
        self.n_obs = int(positions.size)
        self._indptr: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_indptr"] = None
        return state

    def close(self) -> None:
        """Close the file handle and drop the cached row pointers."""
        super().close()
        self._indptr = None

    def _row_pointers(self) -> np.ndarray:
        # 8 bytes per stored row (21 MB for ROSMAP), read once per process.
        if self._indptr is None:
            self._indptr = self._open()["X"]["indptr"][:].astype(np.int64)
        return self._indptr

    def read_csr(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(data, indices, indptr)`` of selected rows ``start:end``, ``indptr`` from 0."""
        if self.kind != "sparse":
            return _csr_parts(sparse.csr_matrix(self.read(start, end)))
        wanted = self.positions[start:end]
        pointers = self._row_pointers()
        lo, hi = pointers[wanted], pointers[wanted + 1]
        lengths = hi - lo
        order = np.argsort(wanted, kind="stable")
        sorted_lo, sorted_hi = lo[order], hi[order]
        # A new request starts where the next row's values begin far past the current end.
        reach = np.maximum.accumulate(sorted_hi) if sorted_hi.size else sorted_hi
        new = np.ones(order.size, dtype=bool)
        new[1:] = sorted_lo[1:] - reach[:-1] > _MERGE_GAP
        request = np.cumsum(new) - 1
        request_lo = sorted_lo[new]
        request_hi = (
            np.maximum.reduceat(sorted_hi, np.flatnonzero(new)) if order.size else sorted_hi
        )
        sizes = request_hi - request_lo
        offsets = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        group = self._open()["X"]
        data = np.empty(int(offsets[-1]), dtype=group["data"].dtype)
        indices = np.empty(int(offsets[-1]), dtype=group["indices"].dtype)
        for r_lo, r_hi, o_lo in zip(
            request_lo.tolist(), request_hi.tolist(), offsets.tolist(), strict=False
        ):
            if r_hi > r_lo:
                size = r_hi - r_lo
                group["data"].read_direct(data, np.s_[r_lo:r_hi], np.s_[o_lo : o_lo + size])
                group["indices"].read_direct(indices, np.s_[r_lo:r_hi], np.s_[o_lo : o_lo + size])
        # Where each wanted row's values sit in the buffers, in the asked order.
        row_request = np.empty(order.size, dtype=np.int64)
        row_request[order] = request
        buffer_start = lo - request_lo[row_request] + offsets[:-1][row_request]
        indptr = np.zeros(wanted.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        take = np.arange(int(indptr[-1]), dtype=np.int64) + np.repeat(
            buffer_start - indptr[:-1], lengths
        )
        return data[take], indices[take], indptr

    def read(self, start: int, end: int) -> Any:
        """Selected rows ``start:end`` as a CSR matrix or a dense array (as stored)."""
        if self.kind == "dense":
            wanted = self.positions[start:end]
            unique, inverse = np.unique(wanted, return_inverse=True)
            return self._open()["X"][unique][inverse]
        data, indices, indptr = self.read_csr(start, end)
        return sparse.csr_matrix((data, indices, indptr), shape=(end - start, self.n_vars))

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, int]]:
        """``(start, end)`` bounds of consecutive chunks of at most ``chunk_size`` rows."""
        if chunk_size < 1:
            msg = f"chunk_size={chunk_size}: must be at least 1 (params.yaml: compute.chunk_size)."
            raise InputError(msg)
        for start in range(0, self.n_obs, chunk_size):
            yield start, min(start + chunk_size, self.n_obs)


def _csr_parts(matrix: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return matrix.data, matrix.indices, matrix.indptr.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Writing the one matrix, row chunk by row chunk
# --------------------------------------------------------------------------------------------
class CsrAppender:
    """Append CSR row chunks to ``X`` of an open h5ad (h5py) file.

    The datasets grow as chunks arrive, so the matrix is never whole in memory (only the row
    pointers are, 8 bytes a row). ``X`` is stored the way anndata stores a CSR matrix
    (``encoding-type: csr_matrix``), uncompressed. Values are written in whole blocks of the
    datasets' chunk size, ``data`` and ``indices`` in lockstep, so the file's bytes do not depend
    on the sizes of the chunks appended.
    """

    _BLOCK = 1 << 18

    def __init__(self, handle: Any, *, n_vars: int, dtype: Any = np.float32) -> None:
        self._group = handle.create_group("X")
        self._group.attrs["encoding-type"] = "csr_matrix"
        self._group.attrs["encoding-version"] = "0.1.0"
        self.n_vars = int(n_vars)
        self.n_obs = 0
        self.nnz = 0
        self._columns = [
            self._group.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=kind, chunks=(self._BLOCK,)
            )
            for name, kind in (("data", dtype), ("indices", np.int32))
        ]
        self._pending: list[list[np.ndarray]] = [[], []]
        self._n_pending = 0
        self._row_ends: list[np.ndarray] = []

    def append(self, matrix: sparse.csr_matrix) -> None:
        """Append the rows of ``matrix`` (canonical CSR with ``n_vars`` columns)."""
        if matrix.shape[1] != self.n_vars:
            msg = f"appending {matrix.shape[1]} columns to a matrix of {self.n_vars}."
            raise InputError(msg)
        for pending, values, column in zip(
            self._pending, (matrix.data, matrix.indices), self._columns, strict=True
        ):
            pending.append(np.asarray(values, dtype=column.dtype))
        self._row_ends.append(matrix.indptr[1:].astype(np.int64) + self.nnz)
        self.n_obs += matrix.shape[0]
        self.nnz += int(matrix.nnz)
        self._n_pending += int(matrix.nnz)
        if self._n_pending >= self._BLOCK:
            self._flush(whole_blocks=True)

    def _flush(self, *, whole_blocks: bool) -> None:
        merged = [
            np.concatenate(p) if p else np.zeros(0, c.dtype)
            for p, c in zip(self._pending, self._columns, strict=True)
        ]
        size = merged[0].size
        n = (size // self._BLOCK) * self._BLOCK if whole_blocks else size
        # One resize and one write per block and column, in a fixed order.
        for lo in range(0, n, self._BLOCK):
            hi = min(lo + self._BLOCK, n)
            for column, values in zip(self._columns, merged, strict=True):
                start = column.shape[0]
                column.resize((start + hi - lo,))
                column[start : start + hi - lo] = values[lo:hi]
        self._pending = [[values[n:]] if size > n else [] for values in merged]
        self._n_pending = size - n

    def close(self) -> None:
        """Write what is pending, the row pointers and the matrix shape."""
        self._flush(whole_blocks=False)
        indptr = np.concatenate([np.zeros(1, dtype=np.int64), *self._row_ends])
        self._group.create_dataset("indptr", data=indptr)
        self._group.attrs["shape"] = np.array([self.n_obs, self.n_vars], dtype=np.int64)


@contextlib.contextmanager
def streamed_h5ad(path: str | Path, *, n_vars: int) -> Iterator[StreamedH5ad]:
    """Write an h5ad whose ``X`` arrives in row chunks; ``obs``, ``var`` and ``uns`` come last.

    Use as ``with streamed_h5ad(path, n_vars=n) as out: out.append(chunk) ...; out.obs = ...``.
    The file is written to a temporary path and renamed into place only when the block exits
    cleanly and the result reads back as an AnnData of the right shape.
    """
    import anndata as ad
    import h5py

    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            out = StreamedH5ad(handle, n_vars=n_vars)
            yield out
            out.finish()
        written = ad.read_h5ad(tmp, backed="r")
        try:
            if written.shape != (out.appender.n_obs, n_vars):
                msg = f"{path}: wrote {written.shape}, expected {(out.appender.n_obs, n_vars)}."
                raise RuntimeError(msg)
        finally:
            written.file.close()


class StreamedH5ad:
    """The handle :func:`streamed_h5ad` yields: append row chunks, then set ``obs`` and ``var``."""

    def __init__(self, handle: Any, *, n_vars: int) -> None:
        self._handle = handle
        self.appender = CsrAppender(handle, n_vars=n_vars)
        self.obs: pd.DataFrame | None = None
        self.var: pd.DataFrame | None = None
        self.uns: Mapping[str, Any] = {}
        self.obsm: Mapping[str, Any] = {}

    def append(self, matrix: sparse.csr_matrix) -> None:
        """Append row chunk ``matrix``."""
        self.appender.append(matrix)

    def finish(self) -> None:
        """Write ``obs``, ``var``, ``uns`` and the empty elements anndata expects."""
        from anndata.io import write_elem

        if self.obs is None or self.var is None:
            msg = "streamed_h5ad: set obs and var before the block ends."
            raise RuntimeError(msg)
        if len(self.obs) != self.appender.n_obs or len(self.var) != self.appender.n_vars:
            msg = (
                f"streamed_h5ad: obs/var sizes {len(self.obs)} x {len(self.var)} do not match X "
                f"{self.appender.n_obs} x {self.appender.n_vars}."
            )
            raise InputError(msg)
        self.appender.close()
        handle = self._handle
        handle.attrs["encoding-type"] = "anndata"
        handle.attrs["encoding-version"] = "0.1.0"
        write_elem(handle, "obs", self.obs)
        write_elem(handle, "var", self.var)
        write_elem(handle, "uns", dict(self.uns))
        write_elem(handle, "obsm", dict(self.obsm))
        for name in ("varm", "obsp", "varp", "layers"):
            write_elem(handle, name, {})


# --------------------------------------------------------------------------------------------
# Cell tables
# --------------------------------------------------------------------------------------------
def write_cells(table: pd.DataFrame, path: str | Path) -> None:
    """Write a cell table (index: cell id) as Parquet, atomically; dtypes are kept."""
    if MATRIX_ROW not in table.columns:
        msg = f"{path}: a cell table needs the column {MATRIX_ROW!r} (the cell's matrix row)."
        raise InputError(msg)
    with atomic_output(path) as tmp:
        table.to_parquet(tmp, engine="pyarrow", index=True, compression="zstd")


def read_cells(path: str | Path, *, what: str = "cell table") -> pd.DataFrame:
    """Read a cell table written by :func:`write_cells`."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: {what} not found. Run the stage that writes it (`dvc repro`) or check paths in params.yaml."
        raise MissingInputError(msg)
    table = pd.read_parquet(path, engine="pyarrow")
    if MATRIX_ROW not in table.columns:
        msg = (
            f"{path}: not a cell table (no column {MATRIX_ROW!r}); rerun the stage that writes it."
        )
        raise InputError(msg)
    return table


def cell_rows(table: pd.DataFrame, matrix: str | Path) -> SelectedRows:
    """A reader of the counts of ``table``'s cells, in the table's order."""
    return SelectedRows(matrix, table[MATRIX_ROW].to_numpy(dtype=np.int64))


def read_obs(path: str | Path) -> pd.DataFrame:
    """``obs`` of an h5ad, read without touching ``X``."""
    return _read_elements(path, ("obs",))[0]


def cell_table(obs: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """The cell table of the matrix rows selected by boolean ``mask``: their obs and rows."""
    if MATRIX_ROW in obs.columns:
        msg = f"obs has a column {MATRIX_ROW!r}, a name the pipeline keeps for matrix rows; rename it."
        raise InputError(msg)
    table = obs[mask].copy()
    table[MATRIX_ROW] = np.flatnonzero(mask).astype(np.int64)
    return table
