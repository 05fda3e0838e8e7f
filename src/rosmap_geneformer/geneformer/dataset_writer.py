"""Writing a ``datasets`` dataset in its ``save_to_disk`` layout, batch by batch.

The tokenizer's output is written straight into the layout ``Dataset.save_to_disk`` produces
(Arrow IPC stream shards, ``dataset_info.json``, ``state.json``), so memory does not grow with
the number of cells and ``datasets.load_from_disk`` (and Geneformer's own tools) read it.
Columns, in Geneformer's order: ``input_ids`` (``List(int16)`` when the dictionary's gene tokens
are ``numpy.int16`` as in gc30M, otherwise ``List(int32)``), the requested label columns,
``length`` (int64). Label columns are typed as ``Dataset.from_dict`` would type them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rosmap_geneformer.errors import InputError
from rosmap_geneformer.geneformer.encoding import ChunkResult

CELL_ID = "cell_id"
# datasets' default shard size for save_to_disk.
MAX_SHARD_BYTES = 500 * 10**6


# --------------------------------------------------------------------------------------------
# The save_to_disk layout, written batch by batch
# --------------------------------------------------------------------------------------------
class _HashingFile:
    """A write-only file that hashes what passes through (the dataset fingerprint)."""

    def __init__(self, path: Path) -> None:
        import xxhash

        self._fh = path.open("wb")
        self._hash = xxhash.xxh64()
        self.closed = False
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.bytes += view.nbytes
        return self._fh.write(view)

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
        self.closed = True

    def digest(self) -> bytes:
        return self._hash.digest()


class DatasetWriter:
    """Write record batches into the ``save_to_disk`` layout of a ``datasets.Dataset``.

    Shards are Arrow IPC streams named ``data-{i:05d}-of-{n:05d}.arrow`` (a new one starts after
    ``max_shard_bytes``), with ``dataset_info.json`` and ``state.json`` as ``save_to_disk``
    writes them. The fingerprint is a hash of the shard bytes, so equal content gives equal
    files. ``datasets.load_from_disk`` reads the result.

    Parameters
    ----------
    directory
        The (new, empty) dataset directory.
    schema
        The Arrow schema, with ``datasets``' ``huggingface`` metadata holding the features.
    max_shard_bytes
        Shard size limit (default :data:`MAX_SHARD_BYTES`, datasets' 500 MB).
    """

    def __init__(self, directory: Path, schema: Any, *, max_shard_bytes: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        self.max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        self._shards: list[Path] = []
        self._digests: list[bytes] = []
        self._file: _HashingFile | None = None
        self._writer: Any = None
        self.n_rows = 0

    def _open_shard(self) -> None:
        import pyarrow as pa

        path = self.directory / f".shard-{len(self._shards):05d}.arrow"
        self._shards.append(path)
        self._file = _HashingFile(path)
        self._writer = pa.ipc.new_stream(self._file, self.schema)

    def _close_shard(self) -> None:
        if self._writer is not None and self._file is not None:
            self._writer.close()
            self._file.close()
            self._digests.append(self._file.digest())
            self._writer = self._file = None

    def write(self, batch: Any) -> None:
        """Append one ``pyarrow.RecordBatch`` with the writer's schema."""
        if self._file is not None and self._file.bytes >= self.max_shard_bytes:
            self._close_shard()
        if self._writer is None:
            self._open_shard()
        self._writer.write_batch(batch)
        self.n_rows += batch.num_rows

    def close(self) -> list[Path]:
        """Finish the shards and write ``state.json`` and ``dataset_info.json``."""
        import xxhash

        if self._writer is None and not self._shards:
            self._open_shard()  # an empty dataset still has one shard with the schema
        self._close_shard()
        n = len(self._shards)
        final = []
        for i, path in enumerate(self._shards):
            target = self.directory / f"data-{i:05d}-of-{n:05d}.arrow"
            path.rename(target)
            final.append(target)
        state = {
            "_data_files": [{"filename": p.name} for p in final],
            "_fingerprint": xxhash.xxh64(b"".join(self._digests)).hexdigest(),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        with (self.directory / "state.json").open("w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2, sort_keys=True)
        # What save_to_disk writes for a Dataset built in memory (empty descriptive fields).
        info = {
            "citation": "",
            "description": "",
            "features": self.features,
            "homepage": "",
            "license": "",
        }
        with (self.directory / "dataset_info.json").open("w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
        return final


# --------------------------------------------------------------------------------------------
# Columns, schema and record batches, typed as datasets types them
# --------------------------------------------------------------------------------------------
def obs_label_arrays(obs: pd.DataFrame, columns: Sequence[str], *, source: str) -> dict[str, Any]:
    """Whole-column Arrow arrays of the label columns, typed as ``Dataset.from_dict`` would.

    ``cell_id`` comes from ``obs_names`` unless obs has such a column. Values are taken as
    Python objects (``Series.tolist()``, as Geneformer does), so strings become ``string`` and
    integers ``int64``; other types are written as strings. Missing values become nulls.
    """
    import pyarrow as pa

    missing = [c for c in columns if c not in obs.columns and c != CELL_ID]
    if missing:
        msg = (
            f"{source}: obs lacks column(s) {missing} asked for as dataset columns; it has "
            f"{list(obs.columns)}. Fix tokenize.columns in params.yaml or --columns."
        )
        raise InputError(msg)
    reserved = {"input_ids", "length"} & set(columns)
    if reserved:
        msg = f"columns {sorted(reserved)} are written by the tokenizer; do not ask for them."
        raise InputError(msg)
    if len(set(columns)) != len(columns):
        msg = f"columns {list(columns)} name a column twice."
        raise InputError(msg)
    arrays = {}
    for column in columns:
        if column == CELL_ID and column not in obs.columns:
            values = [str(v) for v in obs.index]
        else:
            values = [None if _is_missing(v) else v for v in obs[column].tolist()]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            array = None
        if array is None or str(array.type) not in _VALUE_DTYPES:
            array = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        arrays[column] = array
    return arrays


# Arrow type -> datasets Value dtype, for the label column types we write.
_VALUE_DTYPES = {"string": "string", "int64": "int64", "double": "float64", "bool": "bool"}


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _features(label_arrays: dict[str, Any], token_dtype: np.dtype) -> dict[str, Any]:
    """The ``datasets`` features dict (``Features.to_dict()`` form) of the output columns."""
    features: dict[str, Any] = {
        "input_ids": {
            "feature": {"dtype": np.dtype(token_dtype).name, "_type": "Value"},
            "_type": "List",
        }
    }
    for name, array in label_arrays.items():
        features[name] = {"dtype": _VALUE_DTYPES[str(array.type)], "_type": "Value"}
    features["length"] = {"dtype": "int64", "_type": "Value"}
    return features


def arrow_schema(label_arrays: dict[str, Any], token_dtype: np.dtype) -> Any:
    """The Arrow schema with the ``huggingface`` metadata that ``datasets`` writes."""
    import pyarrow as pa

    fields = [pa.field("input_ids", pa.list_(pa.from_numpy_dtype(np.dtype(token_dtype))))]
    fields += [pa.field(name, array.type) for name, array in label_arrays.items()]
    fields.append(pa.field("length", pa.int64()))
    metadata = {"info": {"features": _features(label_arrays, token_dtype)}}
    return pa.schema(fields, metadata={"huggingface": json.dumps(metadata)})


def record_batch(result: ChunkResult, label_arrays: dict[str, Any], schema: Any) -> Any:
    """One encoded chunk as a ``pyarrow.RecordBatch`` of ``schema`` (its cells' labels taken)."""
    import pyarrow as pa

    offsets = np.zeros(result.lengths.size + 1, dtype=np.int32)
    np.cumsum(result.lengths, out=offsets[1:])
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(result.values))
    take = pa.array(result.cells)
    columns = [input_ids]
    for name, array in label_arrays.items():
        column = array.take(take)
        target = schema.field(name).type
        columns.append(column if column.type == target else column.cast(target))
    columns.append(pa.array(result.lengths))
    return pa.RecordBatch.from_arrays(columns, schema=schema)
